//! Classification: top-k labels with probabilities and logits, per image.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use model_store::preprocess::DecodeLimits;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::{ImageUpload, prepare_batch};
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
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

/// One class of a prediction.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassScore {
    /// Output index.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// Softmax probability.
    pub probability: f64,
    /// Raw score before softmax.
    pub logit: f32,
}

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
    let model = state.model(&model)?;
    predict(state, model, params, upload).await
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
    let model = state.default_model()?;
    predict(state, model, params, upload).await
}

async fn predict(
    state: AppState,
    model: std::sync::Arc<model_store::LoadedModel>,
    params: PredictParams,
    upload: ImageUpload,
) -> ApiResult<Json<PredictResponse>> {
    let top_k = match params.top_k {
        Some(0) => return Err(ApiError::BadRequest("top_k must be at least 1".into())),
        Some(k) => k.min(model.classes.len()),
        None => 5.min(model.classes.len()),
    };
    let limits = DecodeLimits {
        max_pixels: state.settings.max_pixels,
    };
    let started = Instant::now();
    let m = model.clone();
    let x = state
        .compute
        .run(move || prepare_batch(&m, &upload.images, limits))
        .await?;
    // Concurrent requests for this model share one forward pass.
    let logits = state.batcher.logits(model.clone(), x).await?;
    let predictions = logits
        .iter()
        .map(|row| Prediction {
            top_k: top_classes(row, top_k, &model.classes),
        })
        .collect();
    Ok(Json(PredictResponse {
        model: model.name().to_string(),
        predictions,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// The `k` most probable classes; softmax in f64 with the max subtracted.
fn top_classes(logits: &[f32], k: usize, labels: &[String]) -> Vec<ClassScore> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable sort: ties keep the lower index first, as torch.topk does on CPU.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(k)
        .map(|i| ClassScore {
            class_index: i,
            label: labels[i].clone(),
            probability: exps[i] / sum,
            logit: logits[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_classes_are_sorted_and_probabilities_sum_to_one() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let top = top_classes(&[1.0, 3.0, 2.0], 3, &labels);
        assert_eq!(
            top.iter().map(|c| c.class_index).collect::<Vec<_>>(),
            [1, 2, 0]
        );
        let total: f64 = top.iter().map(|c| c.probability).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }
}
