//! Classification: top-k labels with probabilities and logits, per image.

use std::time::Instant;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use model_store::preprocess::DecodeLimits;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::{ImageUpload, prepare_batch};
use crate::state::AppState;

/// Query of the predict endpoints.
#[derive(Debug, Deserialize)]
pub struct PredictParams {
    /// How many classes to return per image (default 5, at most the class count).
    pub top_k: Option<usize>,
}

/// One class of a prediction.
#[derive(Debug, Serialize)]
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
#[derive(Debug, Serialize)]
pub struct Prediction {
    /// Highest probabilities first.
    pub top_k: Vec<ClassScore>,
}

/// `POST /models/{model}/predict`, `POST /predict`.
#[derive(Debug, Serialize)]
pub struct PredictResponse {
    /// The model that answered.
    pub model: String,
    /// One entry per image, in request order.
    pub predictions: Vec<Prediction>,
    /// Decode, preprocessing and the forward pass, in milliseconds.
    pub elapsed_ms: f64,
}

/// Predict routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/predict", post(predict_default))
        .route("/models/{model}/predict", post(predict_model))
}

/// Classifies images with the named model; several `image` fields are one batch.
async fn predict_model(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<PredictParams>,
    upload: ImageUpload,
) -> ApiResult<Json<PredictResponse>> {
    let model = state.model(&model)?;
    predict(state, model, params, upload).await
}

/// Classifies images with the default model.
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
    let logits = state
        .compute
        .run(move || {
            let x = prepare_batch(&m, &upload.images, limits)?;
            Ok(m.logits(&x)?
                .to_vec2::<f32>()
                .map_err(model_store::Error::from)?)
        })
        .await?;
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
