//! The Open Inference Protocol (KServe v2 REST): server and model metadata,
//! health, and inference, so that Triton's, KServe's and MLServer's
//! clients work unchanged. The wire format is `crate::oip`'s; inference
//! runs through the same pipeline, limits and dynamic batching as
//! `/predict`. Every model has one version, `1`: the `/versions/{version}`
//! paths accept that one.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use model_store::preprocess;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, body_error};
use crate::oip::{self, Batch, ModelMetadata, ServerMetadata};
use crate::openapi::{Binary, V2Errors};
use crate::pipeline::Pipeline;
use crate::state::AppState;

/// The protocol's routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(server_metadata))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(model_metadata))
        .routes(routes!(model_version_metadata))
        .routes(routes!(model_ready))
        .routes(routes!(model_version_ready))
        .routes(routes!(infer))
        .routes(routes!(infer_version))
}

/// The model, if `version` is its one version.
fn versioned(model: &str, version: &str) -> ApiResult<()> {
    if version == oip::VERSION {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "model '{model}' has no version '{version}'; convscope keeps one version of each model, '{}'",
            oip::VERSION
        )))
    }
}

/// Server metadata: name, version and the extensions it implements.
#[utoipa::path(get, path = "/v2", tag = "inference-protocol",
    responses((status = 200, description = "The server's name, version and protocol extensions.", body = ServerMetadata), V2Errors))]
async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata::new())
}

/// Liveness (no API key needed): 200 while the process answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "inference-protocol",
    responses((status = 200, description = "The server is live (empty body).")))]
async fn live() -> StatusCode {
    StatusCode::OK
}

/// Readiness (no API key needed): the server binds only once the model
/// store is loaded, so 200 once it answers.
#[utoipa::path(get, path = "/v2/health/ready", tag = "inference-protocol",
    responses((status = 200, description = "Every model is loaded (empty body).")))]
async fn ready() -> StatusCode {
    StatusCode::OK
}

/// A model's inputs and outputs.
#[utoipa::path(get, path = "/v2/models/{model}", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10")),
    responses((status = 200, description = "Inputs `input` (FP32 [-1, C, H, W]) and `image` (BYTES [-1]); outputs `logits` and `probabilities` (FP32 [-1, classes]).", body = ModelMetadata), V2Errors))]
async fn model_metadata(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
) -> ApiResult<Json<ModelMetadata>> {
    let model = state.model(&model)?;
    Ok(Json(ModelMetadata::of(&model)))
}

/// A model version's inputs and outputs (version `1`).
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
           ("version" = String, Path, description = "`1`, the only version.", example = "1")),
    responses((status = 200, description = "As `GET /v2/models/{model}`.", body = ModelMetadata), V2Errors))]
async fn model_version_metadata(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> ApiResult<Json<ModelMetadata>> {
    let model = state.model(&model)?;
    versioned(model.name(), &version)?;
    Ok(Json(ModelMetadata::of(&model)))
}

/// Whether a model is ready: 200 when it is loaded, 404 when there is none.
#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10")),
    responses((status = 200, description = "The model is loaded (empty body)."), V2Errors))]
async fn model_ready(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.model(&model)?;
    Ok(StatusCode::OK)
}

/// Whether a model version is ready (version `1`).
#[utoipa::path(get, path = "/v2/models/{model}/versions/{version}/ready", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
           ("version" = String, Path, description = "`1`, the only version.", example = "1")),
    responses((status = 200, description = "The model is loaded (empty body)."), V2Errors))]
async fn model_version_ready(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> ApiResult<StatusCode> {
    let model = state.model(&model)?;
    versioned(model.name(), &version)?;
    Ok(StatusCode::OK)
}

/// Runs the model: FP32 `input` (preprocessed) or BYTES `image` (encoded
/// files), answered with `logits` and/or `probabilities`. With
/// `Inference-Header-Content-Length`, the body is that many bytes of JSON
/// followed by each binary input's bytes (tritonclient's default).
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
           ("Inference-Header-Content-Length" = Option<u64>, Header, description = "Bytes of JSON at the start of a binary body; the tensors' bytes follow.")),
    request_body(description = "The inference request: JSON, or (with `Inference-Header-Content-Length`) JSON followed by binary tensor data. gzip/deflate `Content-Encoding` is accepted.", content(
        (oip::InferRequest = "application/json"),
        (Binary = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The outputs. With binary outputs the body is JSON of `Inference-Header-Content-Length` bytes followed by their data; compressed when `Accept-Encoding` asks for gzip or deflate.",
         content((oip::InferResponse = "application/json"), (Binary = "application/octet-stream")),
         headers(("Inference-Header-Content-Length" = u64, description = "Bytes of JSON at the start of a binary answer."))),
        V2Errors,
    ))]
async fn infer(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    run(&state, &model, &headers, body).await
}

/// Runs a model version (version `1`), as `POST /v2/models/{model}/infer`.
#[utoipa::path(post, path = "/v2/models/{model}/versions/{version}/infer", tag = "inference-protocol",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
           ("version" = String, Path, description = "`1`, the only version.", example = "1"),
           ("Inference-Header-Content-Length" = Option<u64>, Header, description = "Bytes of JSON at the start of a binary body; the tensors' bytes follow.")),
    request_body(description = "As for `POST /v2/models/{model}/infer`.", content(
        (oip::InferRequest = "application/json"),
        (Binary = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "As for `POST /v2/models/{model}/infer`.",
         content((oip::InferResponse = "application/json"), (Binary = "application/octet-stream")),
         headers(("Inference-Header-Content-Length" = u64, description = "Bytes of JSON at the start of a binary answer."))),
        V2Errors,
    ))]
async fn infer_version(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    versioned(state.model(&model)?.name(), &version)?;
    run(&state, &model, &headers, body).await
}

async fn run(
    state: &AppState,
    model: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(state, model)?;
    let body = body.map_err(|e| body_error(e.status(), e.body_text()))?;
    let body = oip::decompress(headers, body, state.settings.max_body_bytes)?;
    let spec = &pipeline.model.manifest.input;
    let expect = oip::Expect {
        input: [spec.channels, spec.height, spec.width],
        max_batch: state.settings.max_batch,
    };
    let oip::Decoded { id, batch, outputs } =
        oip::parse(&body, oip::header_length(headers)?, expect)?;
    drop(body);
    let model = pipeline.model.clone();
    let x = match batch {
        Batch::Tensor { values, shape } => {
            preprocess::tensor_input(values, &shape, &model.manifest, &model.device)?
        }
        Batch::Images(images) => pipeline.on_images(images, |_, x, _| Ok(x)).await?,
    };
    // Concurrent requests for this model share one forward pass, /predict's included.
    let logits = state.batcher.logits(model.clone(), x).await?;
    Ok(oip::respond(
        &model,
        id,
        &outputs,
        &logits,
        headers.get(header::ACCEPT_ENCODING),
    ))
}
