//! Which pixels the class score is most sensitive to: vanilla gradients and
//! SmoothGrad, as a heatmap, an overlay on the upload, or numbers.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::inspect::saliency;
use model_store::preprocess;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::render::{self, Colormap};
use crate::routes::output::{Output, png_response};
use crate::state::AppState;

/// `vanilla` or `smoothgrad`.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SaliencyMethod {
    /// One gradient.
    #[default]
    Vanilla,
    /// The mean gradient over noisy copies.
    Smoothgrad,
}

/// Query of the saliency endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SaliencyParams {
    /// Class index or label (default: the predicted class).
    #[param(example = "cat")]
    pub class: Option<String>,
    /// `vanilla` (default) or `smoothgrad`.
    #[serde(default)]
    #[param(inline)]
    pub method: SaliencyMethod,
    /// SmoothGrad copies, 1-200 (default 25).
    #[param(minimum = 1, maximum = 200, default = 25)]
    pub samples: Option<usize>,
    /// SmoothGrad noise as a fraction of the input's range, 0-1 (default 0.15).
    #[param(minimum = 0.0, maximum = 1.0, default = 0.15)]
    pub noise: Option<f64>,
    /// SmoothGrad seed (default 0).
    #[param(minimum = 0, default = 0)]
    pub seed: Option<i64>,
    /// `heatmap` (default here: the map at the model's input size), `overlay`, `json`.
    #[param(inline)]
    pub output: Option<Output>,
    /// Weight of the map in the overlay, 0-1 (default 0.5).
    #[param(minimum = 0.0, maximum = 1.0, default = 0.5)]
    pub alpha: Option<f64>,
    /// Colormap (default `gray`).
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// One image's saliency.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SaliencyResult {
    /// Which image of the request.
    pub image: usize,
    /// The class explained.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// Its logit.
    pub score: f32,
    /// `[H][W]` in `[0, 1]`: max over channels of |gradient|, min-max scaled.
    pub saliency: Vec<Vec<f32>>,
    /// `[C][H][W]`: ∂ logit / ∂ normalised input.
    pub gradient: Vec<Vec<Vec<f32>>>,
}

/// `output=json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SaliencyJson {
    /// The model.
    pub model: String,
    /// `vanilla` or `smoothgrad`.
    pub method: &'static str,
    /// `[H, W]`.
    pub shape: [usize; 2],
    /// The first image's result.
    #[serde(flatten)]
    pub first: SaliencyResult,
    /// Every image's.
    pub results: Vec<SaliencyResult>,
}

/// `/models/{model}/saliency`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(saliency_get, saliency_map))
}

/// Input-gradient saliency for a stored image (`?input=<id>` from `POST /inputs`).
#[utoipa::path(
    get,
    path = "/models/{model}/saliency",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), SaliencyParams),
    responses(
        (status = 200, description = "The saliency map as a PNG heatmap or overlay, or JSON (`output`).", content(
            (Binary = "image/png"), (SaliencyJson = "application/json"))),
        ImageErrors,
    )
)]
async fn saliency_get(
    state: State<AppState>,
    path: ApiPath<String>,
    query: ApiQuery<SaliencyParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    saliency_map(state, path, query, upload).await
}

/// Input-gradient saliency for each image.
#[utoipa::path(
    post,
    path = "/models/{model}/saliency",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), SaliencyParams),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "The saliency map as a PNG heatmap or overlay, or JSON (`output`).", content(
            (Binary = "image/png"), (SaliencyJson = "application/json"))),
        ImageErrors,
    )
)]
async fn saliency_map(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<SaliencyParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    let class = match params.class.as_deref() {
        None | Some("") => None,
        Some(c) => Some(model.class_index(c.trim())?),
    };
    // Checked whatever the method, so a bad value never passes silently.
    let samples = match params.samples.unwrap_or(25) {
        s @ 1..=200 => s,
        s => {
            return Err(ApiError::BadRequest(format!(
                "samples must be in 1..=200, got {s}"
            )));
        }
    };
    let samples = match params.method {
        SaliencyMethod::Vanilla => 0,
        SaliencyMethod::Smoothgrad => samples,
    };
    let noise = params.noise.unwrap_or(0.15);
    if !(0.0..=1.0).contains(&noise) {
        return Err(ApiError::BadRequest(format!(
            "noise must be in [0, 1], got {noise}"
        )));
    }
    let alpha = params.alpha.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&alpha) {
        return Err(ApiError::BadRequest(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    let (alpha, noise) = (alpha as f32, noise as f32);
    let output = params.output.unwrap_or(Output::Heatmap);
    if output != Output::Json && upload.images.len() > 1 {
        return Err(ApiError::BadRequest(
            "a picture shows one image; ask for output=json for a batch".into(),
        ));
    }
    let limits = pipeline.limits;
    let cmap = params.colormap.unwrap_or(Colormap::Gray);
    let seed = crate::routes::maximize::seed(params.seed)?;
    let (result, picture) = pipeline
        .on_images(upload.images, move |m, x, images| {
            let classes = vec![class; images.len()];
            let s = saliency::saliency(m, &x, &classes, samples, noise, seed)?;
            let size = (m.manifest.input.height, m.manifest.input.width);
            let picture = match output {
                Output::Json => None,
                Output::Heatmap => Some(render::encode_png(&render::heatmap(
                    &s.map[0],
                    size,
                    (size.1 as u32, size.0 as u32),
                    cmap,
                ))),
                Output::Overlay => {
                    let original = preprocess::decode(&images[0], limits)?.to_rgb8();
                    let region =
                        preprocess::input_region(original.width(), original.height(), &m.manifest)?;
                    Some(render::encode_png(&render::overlay(
                        &original, &s.map[0], size, region, alpha, cmap,
                    )))
                }
            };
            Ok((s, picture))
        })
        .await?;
    if let Some(png) = picture {
        return Ok(png_response(png));
    }
    let s = &model.manifest.input;
    let (c, h, w) = (s.channels, s.height, s.width);
    let results: Vec<SaliencyResult> = (0..result.map.len())
        .map(|i| SaliencyResult {
            image: i,
            class_index: result.class_index[i],
            label: model.classes[result.class_index[i]].clone(),
            score: result.score[i],
            saliency: result.map[i].chunks(w).map(<[f32]>::to_vec).collect(),
            gradient: result.gradient[i]
                .chunks(h * w)
                .take(c)
                .map(|plane| plane.chunks(w).map(<[f32]>::to_vec).collect())
                .collect(),
        })
        .collect();
    Ok(Json(SaliencyJson {
        model: model.name().to_string(),
        method: if samples == 0 {
            "vanilla"
        } else {
            "smoothgrad"
        },
        shape: [h, w],
        first: results[0].clone(),
        results,
    })
    .into_response())
}
