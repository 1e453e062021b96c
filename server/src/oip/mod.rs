//! The Open Inference Protocol (KServe v2) on the wire: the JSON of its
//! requests and answers, the binary tensor data extension (a JSON header
//! of `Inference-Header-Content-Length` bytes, then each binary tensor's
//! bytes in order), the classification extension, its `{"error": ...}`
//! errors and the compression tritonclient can ask for. The routes in
//! `routes/v2.rs` only look the model up and run it; everything a client
//! sees of the protocol is decided here.
//!
//! A model has two inputs, of which a request gives one: `input`, FP32
//! `[N, C, H, W]` already preprocessed, or `image`, BYTES `[N]` holding
//! encoded image files that are decoded and preprocessed as everywhere
//! else (in JSON, as base64 strings: JSON strings cannot hold the bytes).
//! Its outputs are `logits` and `probabilities`, FP32 `[N, classes]`.

mod request;
mod response;

pub use request::{
    Batch, Decoded, Expect, InferRequest, InputParameters, OutputKind, OutputParameters,
    RequestInput, RequestOutput, RequestParameters, Wanted, decompress, header_length, parse,
};
pub use response::{InferResponse, ResponseOutput, TensorData, respond};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use model_store::LoadedModel;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::error::ApiError;

/// The header that says how long the JSON part of a binary body is.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The protocol extensions this server implements (`GET /v2`).
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "classification"];

/// A model's only version: convscope keeps one checkpoint per name.
pub const VERSION: &str = "1";

/// An error answered the protocol's way, `{"error": "..."}`, with the status
/// the rest of the API would give it, except that a body the protocol
/// cannot use is a 400 (as the protocol says), not a 415 or 422.
#[derive(Debug)]
pub struct V2Error(pub ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<model_store::Error> for V2Error {
    fn from(e: model_store::Error) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let status = match self.0.status() {
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                StatusCode::BAD_REQUEST
            }
            s => s,
        };
        let body = json!({ "error": self.0.public_detail() }).to_string();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.0.add_headers(headers);
        response
    }
}

/// Result of a `/v2` handler.
pub type V2Result<T> = Result<T, V2Error>;

pub(crate) fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// `{"error": ...}`: every `/v2` error.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "model 'x' not found; GET /models lists the loaded models"}))]
pub struct V2ErrorBody {
    /// What went wrong and what to send instead.
    pub error: String,
}

/// `GET /v2`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerMetadata {
    /// `convscope`.
    pub name: String,
    /// The server's version.
    pub version: String,
    /// The protocol extensions it implements.
    pub extensions: Vec<String>,
}

impl ServerMetadata {
    /// This server's metadata.
    pub fn new() -> Self {
        Self {
            name: "convscope".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Default for ServerMetadata {
    fn default() -> Self {
        Self::new()
    }
}

/// A tensor's name, type and shape (`-1`: any size).
#[derive(Debug, Serialize, ToSchema)]
pub struct TensorMetadata {
    /// `input`, `image`, `logits` or `probabilities`.
    pub name: String,
    /// `FP32` or `BYTES`.
    pub datatype: String,
    /// Its dimensions; `-1` is the batch.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{model}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMetadata {
    /// The model's name.
    pub name: String,
    /// Its versions: always `["1"]`.
    pub versions: Vec<String>,
    /// `convscope` (candle on this server's device).
    pub platform: String,
    /// `input` (FP32, preprocessed) and `image` (BYTES, encoded files).
    pub inputs: Vec<TensorMetadata>,
    /// `logits` and `probabilities`.
    pub outputs: Vec<TensorMetadata>,
}

impl ModelMetadata {
    /// What `model` takes and gives.
    pub fn of(model: &LoadedModel) -> Self {
        let s = &model.manifest.input;
        let classes = model.classes.len() as i64;
        let tensor = |name: &str, datatype: &str, shape: Vec<i64>| TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        Self {
            name: model.name().to_string(),
            versions: vec![VERSION.into()],
            platform: "convscope".into(),
            inputs: vec![
                tensor(
                    "input",
                    "FP32",
                    vec![-1, s.channels as i64, s.height as i64, s.width as i64],
                ),
                tensor("image", "BYTES", vec![-1]),
            ],
            outputs: vec![
                tensor("logits", "FP32", vec![-1, classes]),
                tensor("probabilities", "FP32", vec![-1, classes]),
            ],
        }
    }
}
