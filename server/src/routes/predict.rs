//! Classification: top-k labels with probabilities and logits, per image.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use model_store::inspect::predict;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::state::AppState;

/// Query of the predict endpoints.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PredictParams {
    /// How many classes to return per image (default 5; more than the class count gives them all).
    #[param(minimum = 1, default = 5, example = 5)]
    pub top_k: Option<usize>,
    /// Ids from `POST /inputs` (comma-separated for a batch) instead of a body.
    pub input: Option<String>,
}

pub use model_store::inspect::predict::ClassScore;

/// The prediction for one image.
#[derive(Debug, Serialize, ToSchema)]
pub struct Prediction {
    /// Highest probabilities first.
    pub top_k: Vec<ClassScore>,
}

/// `POST /models/{model}/predict`, `POST /predict`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PredictResponse {
    /// The model that answered.
    pub model: String,
    /// One entry per image, in request order.
    pub predictions: Vec<Prediction>,
    /// Decode, preprocessing and the forward pass (shared with concurrent
    /// requests when batched, waiting for it included), in milliseconds.
    pub elapsed_ms: f64,
}

/// Predict routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(predict_default))
        .routes(routes!(predict_model))
}

/// Classifies images with the named model; several `image` fields are one batch.
#[utoipa::path(
    post,
    path = "/models/{model}/predict",
    tag = "predict",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), PredictParams),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "The top classes of each image, in request order.", body = PredictResponse,
         example = json!({"model": "resnet20-cifar10", "predictions": [{"top_k": [{"class_index": 3, "label": "cat", "probability": 0.93, "logit": 7.1}]}], "elapsed_ms": 4.2})),
        ImageErrors,
    )
)]
async fn predict_model(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<PredictParams>,
    upload: ImageUpload,
) -> ApiResult<Json<PredictResponse>> {
    let pipeline = Pipeline::new(&state, &model)?;
    predict(&state, pipeline, params, upload).await
}

/// Classifies images with the default model (`--default-model`).
#[utoipa::path(
    post,
    path = "/predict",
    tag = "predict",
    params(PredictParams),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "The top classes of each image, in request order.", body = PredictResponse),
        ImageErrors,
    )
)]
async fn predict_default(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<PredictParams>,
    upload: ImageUpload,
) -> ApiResult<Json<PredictResponse>> {
    let pipeline = Pipeline::for_model(&state, state.default_model()?);
    predict(&state, pipeline, params, upload).await
}

async fn predict(
    state: &AppState,
    pipeline: Pipeline,
    params: PredictParams,
    upload: ImageUpload,
) -> ApiResult<Json<PredictResponse>> {
    let model = pipeline.model.clone();
    let top_k = match params.top_k {
        Some(0) => return Err(ApiError::BadRequest("top_k must be at least 1".into())),
        Some(k) => k.min(model.classes.len()),
        None => 5.min(model.classes.len()),
    };
    let started = Instant::now();
    let x = pipeline.on_images(upload.images, |_, x, _| Ok(x)).await?;
    // Concurrent requests for this model share one forward pass.
    let logits = state.batcher.logits(model.clone(), x).await?;
    let predictions = logits
        .iter()
        .map(|row| Prediction {
            top_k: predict::top_classes(row, top_k, &model.classes),
        })
        .collect();
    Ok(Json(PredictResponse {
        model: model.name().to_string(),
        predictions,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}
