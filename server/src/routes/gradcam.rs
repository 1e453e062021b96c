//! Where the model looks: the Grad-CAM family as an overlay on the uploaded
//! image, a heatmap, or numbers.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::LoadedModel;
use model_store::inspect::grad_cam::{self, Method, Target};
use model_store::preprocess;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, CamMethod, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::render::{self, Colormap};
use crate::routes::output::{Output, png_response};
use crate::state::AppState;

/// Query of the Grad-CAM endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CamParams {
    /// Target layer (default: the last residual block or convolution).
    #[param(example = "layer3")]
    pub layer: Option<String>,
    /// Class index or label, or several separated by commas (default: the predicted class).
    #[param(example = "cat")]
    pub class: Option<String>,
    /// `gradcam` (default), `gradcam++`, `hirescam`, `xgradcam`, `layercam`, `eigencam`, `scorecam`, `ablationcam`.
    #[param(value_type = Option<CamMethod>, inline)]
    pub method: Option<String>,
    /// Average the maps of the image and its mirror image, each times 0.9,
    /// 1 and 1.1 (pytorch-grad-cam's `aug_smooth`; six times the work).
    #[serde(default)]
    pub aug_smooth: bool,
    /// Map the per-channel products by their first principal component
    /// instead of summing them (pytorch-grad-cam's `eigen_smooth`).
    #[serde(default)]
    pub eigen_smooth: bool,
    /// `overlay` (default), `heatmap`, `json`.
    #[serde(default)]
    #[param(inline)]
    pub output: Output,
    /// Weight of the heatmap in the overlay, 0-1 (default 0.5).
    #[param(minimum = 0.0, maximum = 1.0, default = 0.5)]
    pub alpha: Option<f64>,
    /// Heatmap colormap (default `jet`).
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// One explanation.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CamResult {
    /// Which image of the request.
    pub image: usize,
    /// The class explained.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// Its logit.
    pub score: f32,
    /// `[H][W]` in `[0, 1]`: ReLU, then min-max per image.
    pub cam: Vec<Vec<f32>>,
    /// `[H][W]` before ReLU and normalisation.
    pub raw_cam: Vec<Vec<f32>>,
    /// Per-channel weights (gradcam, gradcam++, xgradcam, scorecam); null otherwise.
    pub weights: Option<Vec<f32>>,
}

/// `output=json`: the first explanation's fields at the top level (the
/// contract's shape), and every explanation in `results`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CamJson {
    /// The model.
    pub model: String,
    /// The target layer.
    pub layer: String,
    /// The method.
    pub method: &'static str,
    /// Whether the map is the mean over mirrored and scaled inputs.
    pub aug_smooth: bool,
    /// Whether the map is the principal component of the channel products.
    pub eigen_smooth: bool,
    /// `[H, W]` of the layer.
    pub shape: [usize; 2],
    /// The first explanation.
    #[serde(flatten)]
    pub first: CamResult,
    /// All of them, image by image, class by class.
    pub results: Vec<CamResult>,
}

/// `/models/{model}/gradcam`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(gradcam_get, gradcam))
}

/// A class activation map for a stored image (`?input=<id>` from `POST /inputs`).
#[utoipa::path(
    get,
    path = "/models/{model}/gradcam",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), CamParams),
    responses(
        (status = 200, description = "An RGB overlay at the image's own size, the heatmap at the model's input size (both PNG), or JSON (`output`).", content(
            (Binary = "image/png"), (CamJson = "application/json"))),
        ImageErrors,
    )
)]
async fn gradcam_get(
    state: State<AppState>,
    path: ApiPath<String>,
    query: ApiQuery<CamParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    gradcam(state, path, query, upload).await
}

/// A class activation map for each image (and each class asked for).
#[utoipa::path(
    post,
    path = "/models/{model}/gradcam",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), CamParams),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "An RGB overlay at the image's own size, the heatmap at the model's input size (both PNG), or JSON (`output`).", content(
            (Binary = "image/png"), (CamJson = "application/json"))),
        ImageErrors,
    )
)]
async fn gradcam(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<CamParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    let checked = check(
        &params,
        &model,
        upload.images.len(),
        state.settings.max_batch,
    )?;
    let Checked {
        layer,
        method,
        targets,
        alpha,
    } = checked;
    let channels = model
        .network
        .layer(&layer)
        .and_then(|l| l.output_shape.first().copied())
        .unwrap_or(1);
    crate::routes::saliency::check_passes(
        method.passes(channels, params.aug_smooth) * targets.len(),
        state.settings.max_explanation_passes,
        &format!(
            "{} at {layer} for {} target(s)",
            method.name(),
            targets.len()
        ),
    )?;
    let cmap = params.colormap.unwrap_or(Colormap::Jet);
    let output = params.output;
    let smoothing = grad_cam::Options {
        aug_smooth: params.aug_smooth,
        eigen_smooth: params.eigen_smooth,
        deadline: Some(state.settings.deadline()),
    };
    let (l, limits) = (layer.clone(), pipeline.limits);
    let (set, picture) = pipeline
        .on_images(upload.images, move |m, x, images| {
            let set = grad_cam::grad_cam_with(m, &x, &l, &targets, method, smoothing)?;
            let picture = match output {
                Output::Json => None,
                Output::Heatmap => {
                    let s = &m.manifest.input;
                    let img = render::heatmap(
                        &set.cams[0].cam,
                        set.shape,
                        (s.width as u32, s.height as u32),
                        cmap,
                    );
                    Some(render::encode_png(&img))
                }
                Output::Overlay => {
                    let original = preprocess::decode(&images[0], limits)?.to_rgb8();
                    let region =
                        preprocess::input_region(original.width(), original.height(), &m.manifest)?;
                    let img = render::overlay(
                        &original,
                        &set.cams[0].cam,
                        set.shape,
                        region,
                        alpha,
                        cmap,
                    );
                    Some(render::encode_png(&img))
                }
            };
            Ok((set, picture))
        })
        .await?;
    if let Some(png) = picture {
        return Ok(png_response(png));
    }
    Ok(Json(cam_json(&model, method, smoothing, set)).into_response())
}

/// The parameters of a Grad-CAM request, checked against the model.
struct Checked {
    layer: String,
    method: Method,
    targets: Vec<Target>,
    alpha: f32,
}

fn check(
    params: &CamParams,
    model: &LoadedModel,
    images: usize,
    max_batch: usize,
) -> ApiResult<Checked> {
    let layer = match &params.layer {
        Some(l) => l.clone(),
        None => grad_cam::default_layer(model).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "model '{}' has no layer with a spatial output",
                model.name()
            ))
        })?,
    };
    grad_cam::check_layer(model, &layer)?;
    let method = match params.method.as_deref() {
        None => Method::GradCam,
        Some(m) => Method::parse(query_plus(m)).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown method {m:?}; choose from {} (send gradcam++ as gradcam%2B%2B or gradcampp)",
                grad_cam::METHODS.map(Method::name).join(", ")
            ))
        })?,
    };
    let alpha = params.alpha.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&alpha) {
        return Err(ApiError::BadRequest(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    let classes: Vec<Option<usize>> = match params.class.as_deref() {
        None | Some("") => vec![None],
        Some(list) => list
            .split(',')
            .map(|c| Ok(Some(model.class_index(c.trim())?)))
            .collect::<ApiResult<_>>()?,
    };
    let targets: Vec<Target> = (0..images)
        .flat_map(|image| classes.iter().map(move |&class| Target { image, class }))
        .collect();
    if targets.len() > max_batch {
        return Err(ApiError::TooLarge(format!(
            "{} explanations (images × classes) in one request; the limit is {max_batch} (--max-batch)",
            targets.len(),
        )));
    }
    if params.output != Output::Json && targets.len() > 1 {
        return Err(ApiError::BadRequest(
            "an overlay or heatmap shows one image and one class; ask for output=json for several"
                .into(),
        ));
    }
    Ok(Checked {
        layer,
        method,
        targets,
        alpha: alpha as f32,
    })
}

fn cam_json(
    model: &LoadedModel,
    method: Method,
    smoothing: grad_cam::Options,
    set: grad_cam::CamSet,
) -> CamJson {
    let (h, w) = set.shape;
    let rows = |v: &[f32]| v.chunks(w).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let results: Vec<CamResult> = set
        .cams
        .iter()
        .map(|c| CamResult {
            image: c.image,
            class_index: c.class_index,
            label: model.classes[c.class_index].clone(),
            score: c.score,
            cam: rows(&c.cam),
            raw_cam: rows(&c.raw_cam),
            weights: c.weights.clone(),
        })
        .collect();
    let first = results[0].clone();
    CamJson {
        model: model.name().to_string(),
        layer: set.layer,
        method: method.name(),
        aug_smooth: smoothing.aug_smooth,
        eigen_smooth: smoothing.eigen_smooth,
        shape: [h, w],
        first,
        results,
    }
}

/// `gradcam++` sent unencoded in a query arrives as `gradcam` and two
/// spaces (a `+` is a space in a query string), and `gradcam%2B%2B`
/// encoded twice arrives as itself: both mean `gradcam++`. Anything else is
/// trimmed.
pub fn query_plus(method: &str) -> &str {
    match method {
        "gradcam  " | "gradcam%2B%2B" => "gradcam++",
        other => other.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradcam_plus_plus_survives_query_decoding() {
        assert_eq!(
            Method::parse(query_plus("gradcam  ")),
            Some(Method::GradCamPlusPlus)
        );
        assert_eq!(
            Method::parse(query_plus("gradcam%2B%2B")),
            Some(Method::GradCamPlusPlus)
        );
        assert_eq!(
            Method::parse(query_plus(" layercam ")),
            Some(Method::LayerCam)
        );
        assert_eq!(Method::parse(query_plus("gradcam")), Some(Method::GradCam));
    }
}
