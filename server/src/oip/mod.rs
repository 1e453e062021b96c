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

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
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

/// Whether `path` belongs to the inference protocol.
pub fn is_v2(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// The protocol's error shape for every answer under `/v2`, whoever made
/// it (a handler, the fallbacks, the API key check, the panic catcher):
/// their problem+json becomes `{"error": detail}`, with the request id of
/// a 500 in the text and the same status and headers (the protocol asks
/// for an error status, usually 400; a 422 stays a 422, as `/metrics`
/// counts it). One layer around the whole router, so no error path needs
/// to know about the protocol.
pub async fn protocol_errors(req: Request, next: Next) -> Response {
    if !is_v2(req.uri().path()) {
        return next.run(req).await;
    }
    let response = next.run(req).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Problem bodies are a few hundred bytes.
    let problem: serde_json::Value = axum::body::to_bytes(body, 64 * 1024)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut error = problem["detail"]
        .as_str()
        .unwrap_or("the server failed to handle this request")
        .to_string();
    if let Some(id) = problem["request_id"].as_str() {
        error = format!("{error} (request id {id})");
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(json!({ "error": error }).to_string()))
}

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
