//! How far apart inputs are in a layer's embedding space: N images (with
//! optional labels) → embeddings, N×N matrices per metric, and per-class
//! intra / inter means — the course's "two 6s and two 7s" in one request.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use model_store::inspect::embeddings::{self as emb, Metric};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, LabelledImageForm};
use crate::pipeline::Pipeline;
use crate::state::AppState;

/// Query of the embeddings endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EmbeddingParams {
    /// The layer whose (flattened) output is the embedding; default: the
    /// input of the last linear layer (`fc2` for CNN_A).
    pub layer: Option<String>,
    /// Comma-separated: `euclidean,mse,cosine,cross_entropy,kl` (default: all).
    #[param(example = "mse,cross_entropy")]
    pub metrics: Option<String>,
    /// Comma-separated labels, one per image, when the body carries none.
    pub labels: Option<String>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// Per-class results.
#[derive(Debug, Serialize, ToSchema)]
pub struct Classes {
    /// `class → metric → mean over ordered pairs i ≠ j of that class`.
    pub intra: BTreeMap<String, BTreeMap<&'static str, f64>>,
    /// `"c/d" → metric → mean over rows of c and columns of d`.
    pub inter: BTreeMap<String, BTreeMap<&'static str, f64>>,
    /// `metric → mean of the inter values / mean of the intra values`.
    pub inter_intra_ratio: BTreeMap<&'static str, f64>,
}

/// `POST /models/{model}/embeddings`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// The model.
    pub model: String,
    /// The layer used.
    pub layer: String,
    /// One label per image, or null.
    pub labels: Option<Vec<String>>,
    /// One flattened embedding per image.
    pub embeddings: Vec<Vec<f32>>,
    /// `metric → M` with `M[i][j] = metric(a = item i, b = item j)`.
    pub distances: BTreeMap<&'static str, Vec<Vec<f64>>>,
    /// Present when labels were given.
    pub classes: Option<Classes>,
}

/// `/models/{model}/embeddings`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(embeddings))
}

/// Embeddings of the images and the distances between them.
#[utoipa::path(
    post,
    path = "/models/{model}/embeddings",
    tag = "inspection",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "cnn-a-mnist"), EmbeddingParams),
    request_body(description = "Images with optional labels: multipart `image` and `label` fields in order, JSON `{\"items\": [{\"image\": <base64>, \"label\": \"6\"}]}`, or `?input=` ids.", content(
        (LabelledImageForm = "multipart/form-data"),
        (Base64Images = "application/json"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
    )),
    responses(
        (status = 200, description = "Embeddings, distance matrices per metric and per-class means.", body = EmbeddingResponse),
        ImageErrors,
    )
)]
async fn embeddings(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<EmbeddingParams>,
    upload: ImageUpload,
) -> ApiResult<Json<EmbeddingResponse>> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    let layer = match params.layer {
        Some(l) => {
            model_store::inspect::activations::check_layer(&model, &l)?;
            l
        }
        None => emb::default_layer(&model),
    };
    let metrics: Vec<Metric> = match params.metrics.as_deref() {
        None | Some("") => emb::METRICS.to_vec(),
        Some(list) => list
            .split(',')
            .map(|m| {
                Metric::parse(m.trim()).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "unknown metric {m:?}; choose from {}",
                        emb::METRICS.map(Metric::name).join(", ")
                    ))
                })
            })
            .collect::<ApiResult<_>>()?,
    };
    let labels: Vec<String> = if upload.labels.is_empty() {
        params
            .labels
            .as_deref()
            .map(|l| l.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    } else {
        upload.labels.clone()
    };
    emb::check_labels(&labels, upload.images.len())?;
    let l = layer.clone();
    let embeddings = pipeline
        .on_images(upload.images, move |m, x, _| {
            Ok(emb::embeddings(m, &x, &l)?)
        })
        .await?;
    let mut distances = BTreeMap::new();
    let mut intra: BTreeMap<String, BTreeMap<&'static str, f64>> = BTreeMap::new();
    let mut inter: BTreeMap<String, BTreeMap<&'static str, f64>> = BTreeMap::new();
    let mut ratio = BTreeMap::new();
    for metric in &metrics {
        let matrix = emb::distance_matrix(&embeddings, *metric);
        if !labels.is_empty() {
            let d = emb::class_distances(&matrix, &labels);
            for (c, v) in &d.intra {
                intra
                    .entry(c.clone())
                    .or_default()
                    .insert(metric.name(), *v);
            }
            for (c, v) in &d.inter {
                inter
                    .entry(c.clone())
                    .or_default()
                    .insert(metric.name(), *v);
            }
            if let Some(r) = emb::inter_intra_ratio(&d) {
                ratio.insert(metric.name(), r);
            }
        }
        distances.insert(metric.name(), matrix);
    }
    let classes = (!labels.is_empty()).then_some(Classes {
        intra,
        inter,
        inter_intra_ratio: ratio,
    });
    Ok(Json(EmbeddingResponse {
        model: model.name().to_string(),
        layer,
        labels: (!labels.is_empty()).then_some(labels),
        embeddings,
        distances,
        classes,
    }))
}
