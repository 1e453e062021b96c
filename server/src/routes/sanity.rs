//! Sanity checks for explanations: cascading randomisation of the model's
//! layers from the output side, each step's map compared with the
//! original's, as JSON or a strip of the maps.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::inspect::faithfulness::Explainer;
use model_store::inspect::sanity;
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
use crate::routes::output::png_response;
use crate::state::AppState;

/// Query of the sanity endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SanityParams {
    /// The method: any of `/gradcam`'s or `/saliency`'s, with its default
    /// parameters (default `gradcam`).
    #[param(example = "gradcam")]
    pub method: Option<String>,
    /// The Grad-CAM family's layer (default: `/gradcam`'s).
    pub layer: Option<String>,
    /// The layers to re-initialise, in order, comma-separated (default:
    /// every layer with parameters, output side first; empty: none).
    #[param(example = "linear,layer3.2.bn2,layer3.2.conv2")]
    pub layers: Option<String>,
    /// Seed of the re-initialisation (default 0).
    #[param(minimum = 0, default = 0)]
    pub seed: Option<i64>,
    /// Class index or label (default: the predicted class).
    pub class: Option<String>,
    /// `json` (default) or `png`: the strip of maps, one per step.
    pub format: Option<String>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// One step of the cascade.
#[derive(Debug, Serialize, ToSchema)]
pub struct SanityStep {
    /// The layer re-initialised at this step, with every one before it;
    /// null for the first step, which changes nothing.
    pub layer: Option<String>,
    /// Spearman's rank correlation with the original map.
    pub spearman: f32,
    /// Structural similarity with the original map.
    pub ssim: f32,
}

/// The JSON answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct SanityJson {
    /// The model.
    pub model: String,
    /// The method.
    pub method: String,
    /// The Grad-CAM family's layer (null when the model has none).
    pub layer: Option<String>,
    /// The class explained.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// The unchanged first step, then one per layer re-initialised.
    pub steps: Vec<SanityStep>,
}

/// `/models/{model}/sanity`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(sanity_check))
}

/// Cascading randomisation of one image's explanation.
#[utoipa::path(
    post,
    path = "/models/{model}/sanity",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), SanityParams),
    request_body(description = "One image: a multipart `image` field, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "Spearman and SSIM per step (JSON), or the strip of maps (`format=png`).", content(
            (SanityJson = "application/json"), (Binary = "image/png"))),
        ImageErrors,
    )
)]
async fn sanity_check(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<SanityParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    if upload.images.len() != 1 {
        return Err(ApiError::BadRequest(format!(
            "a sanity check explains one image; got {}",
            upload.images.len()
        )));
    }
    let layer = crate::routes::faithfulness::cam_layer(&model, params.layer.as_deref())?;
    let method = params.method.as_deref().unwrap_or("gradcam");
    if method.contains(',') {
        return Err(ApiError::BadRequest(
            "a sanity check takes one method; score several with /faithfulness".into(),
        ));
    }
    let (name, explainer): (String, Explainer) =
        crate::routes::faithfulness::explainers(method, &model, layer.as_deref())?
            .into_iter()
            .next()
            .expect("one method parsed");
    let passes = explainer.passes(&model);
    let layers: Vec<String> = match params.layers.as_deref() {
        None => sanity::parameter_layers(&model),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
    };
    crate::routes::saliency::check_passes(
        passes * (layers.len() + 1),
        state.settings.max_explanation_passes,
        &format!("a cascade of {} layers with {name}", layers.len()),
    )?;
    let seed = crate::routes::maximize::seed(params.seed)?;
    let png = crate::routes::output::json_or_png(params.format.as_deref())?;
    let class = pipeline.class(params.class.as_deref())?;
    let deadline = state.settings.deadline();
    let (cascade, strip) = pipeline
        .on_images(upload.images, move |m, x, _| {
            let cascade = sanity::cascade(m, &x, class, &explainer, &layers, seed, Some(deadline))?;
            // The strip is drawn here, on the compute pool, not on the
            // server's async threads.
            let strip = png.then(|| {
                let s = &m.manifest.input;
                let (h, w) = (s.height, s.width);
                let tiles: Vec<render::Tile> = cascade
                    .steps
                    .iter()
                    .map(|step| render::Tile {
                        label: match &step.layer {
                            None => "original".into(),
                            Some(l) => format!("{l} ({:.2})", step.spearman),
                        },
                        planes: vec![step.map.clone()],
                    })
                    .collect();
                let scale = (160 / w.max(1)).clamp(1, 16) as u32;
                render::strip(&tiles, h, w, scale, Colormap::Jet).png()
            });
            Ok((cascade, strip))
        })
        .await?;
    if let Some(strip) = strip {
        return Ok(png_response(strip));
    }
    Ok(Json(SanityJson {
        model: model.name().to_string(),
        method: name,
        layer,
        class_index: cascade.class_index,
        label: model.classes[cascade.class_index].clone(),
        seed,
        steps: cascade
            .steps
            .into_iter()
            .map(|st| SanityStep {
                layer: st.layer,
                spearman: st.spearman,
                ssim: st.ssim,
            })
            .collect(),
    })
    .into_response())
}
