//! Which input values the class score owes most to: gradients (vanilla,
//! SmoothGrad) and Captum's attribution methods, each optionally inside a
//! noise tunnel, as a heatmap, an overlay on the upload, or numbers.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::inspect::attribution::{self, Baseline, Reduce, Sign, Tunnel};
use model_store::inspect::grad_cam;
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

/// An attribution method.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaliencyMethod {
    /// The input gradient.
    #[default]
    Vanilla,
    /// The mean input gradient over noisy copies (`vanilla` in a
    /// `smoothgrad` noise tunnel).
    Smoothgrad,
    /// Integrated gradients (`steps`, `baseline`).
    IntegratedGradients,
    /// Input times its gradient.
    InputXGradient,
    /// Gradients through guided ReLUs.
    GuidedBackprop,
    /// Gradients through deconvolution ReLUs.
    Deconvolution,
    /// Guided backprop times Grad-CAM at `layer`.
    GuidedGradcam,
    /// A sliding patch of zeros (`window`, `stride`).
    Occlusion,
}

/// Integrated gradients' baseline.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BaselineParam {
    /// Zeros in the normalised input space.
    Zero,
    /// A black image.
    Black,
    /// The image blurred (Gaussian, σ = 5 px).
    Blur,
}

/// A noise tunnel's reduction.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TunnelParam {
    /// The mean over the noisy copies.
    Smoothgrad,
    /// The mean of the squares.
    SmoothgradSq,
    /// The variance.
    Vargrad,
}

/// Which signs a picture shows.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SignParam {
    /// The magnitude of the channel sum.
    Absolute,
    /// Its positive part.
    Positive,
    /// Its negative part.
    Negative,
    /// Both, with a diverging colormap.
    All,
}

/// The most integrated-gradients steps one request may ask for.
pub const MAX_STEPS: usize = 500;
/// The most noise-tunnel samples one request may ask for.
pub const MAX_SAMPLES: usize = 200;

/// Query of the saliency endpoint.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SaliencyParams {
    /// Class index or label (default: the predicted class).
    #[param(example = "cat")]
    pub class: Option<String>,
    /// The method (default `vanilla`).
    #[serde(default)]
    #[param(inline)]
    pub method: SaliencyMethod,
    /// Integrated gradients: Gauss-Legendre steps, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500, default = 50)]
    pub steps: Option<usize>,
    /// Integrated gradients: where the path starts (default `zero`).
    #[param(inline)]
    pub baseline: Option<BaselineParam>,
    /// Guided Grad-CAM: the Grad-CAM layer (default: `/gradcam`'s).
    pub layer: Option<String>,
    /// Occlusion: the patch side in pixels (default 8, at most the input).
    #[param(minimum = 1)]
    pub window: Option<usize>,
    /// Occlusion: the step between patches, 1 to `window` (default `window / 2`).
    #[param(minimum = 1)]
    pub stride: Option<usize>,
    /// A noise tunnel around the method.
    #[param(inline)]
    pub noise_tunnel: Option<TunnelParam>,
    /// Noise-tunnel (and SmoothGrad) copies, 1-200 (default 25).
    #[param(minimum = 1, maximum = 200, default = 25)]
    pub samples: Option<usize>,
    /// Noise standard deviation as a fraction of the input's range, 0-1 (default 0.15).
    #[param(minimum = 0.0, maximum = 1.0, default = 0.15)]
    pub noise: Option<f64>,
    /// Seed of the noise (default 0).
    #[param(minimum = 0, default = 0)]
    pub seed: Option<i64>,
    /// Pictures: which signs of the channel sum to show, scaled as Captum's
    /// `visualize_image_attr` (default `absolute`; `vanilla` and
    /// `smoothgrad` without `sign` show max over channels of |gradient|).
    #[param(inline)]
    pub sign: Option<SignParam>,
    /// `heatmap` (default here: the map at the model's input size), `overlay`, `json`.
    #[param(inline)]
    pub output: Option<Output>,
    /// Weight of the map in the overlay, 0-1 (default 0.5).
    #[param(minimum = 0.0, maximum = 1.0, default = 0.5)]
    pub alpha: Option<f64>,
    /// Colormap (default `gray`; `rdylgn` for `sign=all`).
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// One image's attributions.
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
    /// `[C][H][W]`, the input's layout.
    pub attributions: Vec<Vec<Vec<f32>>>,
    /// `[H][W]`: the channel sum scaled as Captum's `visualize_image_attr`
    /// (the signs `sign` asks for, 2% outliers clipped), in `[0, 1]`, or
    /// `[−1, 1]` for `sign=all`; what the pictures show but for `vanilla`
    /// and `smoothgrad` without `sign` (those show `saliency`).
    pub map: Vec<Vec<f32>>,
    /// Integrated gradients outside a noise tunnel:
    /// `Σ attributions − (logit(x) − logit(baseline))`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub convergence_delta: Option<f32>,
    /// `vanilla` and `smoothgrad`: `[H][W]` in `[0, 1]`, max over
    /// channels of |gradient|, min-max scaled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saliency: Option<Vec<Vec<f32>>>,
    /// `vanilla` and `smoothgrad`: `[C][H][W]`, ∂ logit / ∂ normalised
    /// input (the attributions themselves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient: Option<Vec<Vec<Vec<f32>>>>,
}

/// `output=json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SaliencyJson {
    /// The model.
    pub model: String,
    /// The method.
    pub method: &'static str,
    /// The noise tunnel, if any (`smoothgrad` is `vanilla` in one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_tunnel: Option<&'static str>,
    /// The method's parameters as used, defaults filled in.
    pub params: serde_json::Value,
    /// `[H, W]`.
    pub shape: [usize; 2],
    /// The first image's result.
    #[serde(flatten)]
    pub first: SaliencyResult,
    /// Every image's.
    pub results: Vec<SaliencyResult>,
}

/// Every method's name, in the contract's order.
pub const METHOD_NAMES: [&str; 8] = [
    "vanilla",
    "smoothgrad",
    "integrated_gradients",
    "input_x_gradient",
    "guided_backprop",
    "deconvolution",
    "guided_gradcam",
    "occlusion",
];

/// A request's method, checked and with its defaults.
#[derive(Clone)]
pub(crate) struct Checked {
    pub method: attribution::Method,
    pub tunnel: Option<Tunnel>,
    pub params: serde_json::Value,
    /// `vanilla` or `smoothgrad`: the gradient fields too.
    pub gradient_fields: bool,
    /// Network passes per image (see `--max-explanation-passes`).
    pub passes: usize,
}

/// 400 when `passes` is over `--max-explanation-passes`, saying what made it.
pub(crate) fn check_passes(passes: usize, limit: usize, what: &str) -> ApiResult<()> {
    if passes > limit {
        return Err(ApiError::BadRequest(format!(
            "{what} takes {passes} network passes; the limit is {limit} (--max-explanation-passes): ask for fewer steps, samples, layers, classes or a larger occlusion stride"
        )));
    }
    Ok(())
}

/// Checks every parameter (whatever the method, so a bad value never
/// passes silently) and fills in the defaults.
pub(crate) fn check(p: &SaliencyParams, model: &model_store::LoadedModel) -> ApiResult<Checked> {
    use attribution::Method as M;
    let bad = |m: String| Err(ApiError::BadRequest(m));
    let steps = p.steps.unwrap_or(50);
    if !(1..=MAX_STEPS).contains(&steps) {
        return bad(format!("steps must be in 1..={MAX_STEPS}, got {steps}"));
    }
    let samples = p.samples.unwrap_or(25);
    if !(1..=MAX_SAMPLES).contains(&samples) {
        return bad(format!(
            "samples must be in 1..={MAX_SAMPLES}, got {samples}"
        ));
    }
    let noise = p.noise.unwrap_or(0.15);
    if !(0.0..=1.0).contains(&noise) {
        return bad(format!("noise must be in [0, 1], got {noise}"));
    }
    let seed = crate::routes::maximize::seed(p.seed)?;
    let input = &model.manifest.input;
    let side = input.height.min(input.width);
    let window = p.window.unwrap_or(8.min(side));
    let stride = p.stride.unwrap_or((window / 2).max(1));
    attribution::check_occlusion(window, stride, input.height, input.width)?;
    if let Some(layer) = &p.layer {
        grad_cam::check_layer(model, layer)?;
    }
    let baseline = match p.baseline.unwrap_or(BaselineParam::Zero) {
        BaselineParam::Zero => Baseline::Zero,
        BaselineParam::Black => Baseline::Black,
        BaselineParam::Blur => Baseline::Blur,
    };
    let reduce = p.noise_tunnel.map(|t| match t {
        TunnelParam::Smoothgrad => Reduce::SmoothGrad,
        TunnelParam::SmoothgradSq => Reduce::SmoothGradSq,
        TunnelParam::Vargrad => Reduce::VarGrad,
    });
    let (method, reduce, params) = match p.method {
        SaliencyMethod::Vanilla => (M::Vanilla, reduce, serde_json::json!({})),
        SaliencyMethod::Smoothgrad => {
            if reduce.is_some() {
                return bad(
                    "smoothgrad is vanilla in a smoothgrad noise tunnel: give method=smoothgrad or noise_tunnel, not both".into(),
                );
            }
            (M::Vanilla, Some(Reduce::SmoothGrad), serde_json::json!({}))
        }
        SaliencyMethod::IntegratedGradients => (
            M::IntegratedGradients { steps, baseline },
            reduce,
            serde_json::json!({"steps": steps, "baseline": baseline.name()}),
        ),
        SaliencyMethod::InputXGradient => (M::InputXGradient, reduce, serde_json::json!({})),
        SaliencyMethod::GuidedBackprop => (M::GuidedBackprop, reduce, serde_json::json!({})),
        SaliencyMethod::Deconvolution => (M::Deconvolution, reduce, serde_json::json!({})),
        SaliencyMethod::GuidedGradcam => {
            let layer = match &p.layer {
                Some(l) => l.clone(),
                None => grad_cam::default_layer(model).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "model '{}' has no layer with a spatial output for Grad-CAM",
                        model.name()
                    ))
                })?,
            };
            grad_cam::check_layer(model, &layer)?;
            let params = serde_json::json!({ "layer": layer });
            (M::GuidedGradCam { layer }, reduce, params)
        }
        SaliencyMethod::Occlusion => (
            M::Occlusion { window, stride },
            reduce,
            serde_json::json!({"window": window, "stride": stride}),
        ),
    };
    let passes = method.passes(input.height, input.width) * reduce.map_or(1, |_| samples);
    let mut params = params;
    let tunnel = reduce.map(|reduce| {
        params["samples"] = samples.into();
        params["noise"] = noise.into();
        params["seed"] = seed.into();
        Tunnel {
            reduce,
            samples,
            noise: noise as f32,
            seed,
        }
    });
    Ok(Checked {
        passes,
        gradient_fields: method == M::Vanilla
            && tunnel.is_none_or(|t| t.reduce == Reduce::SmoothGrad),
        method,
        tunnel,
        params,
    })
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
    let class = pipeline.class(params.class.as_deref())?;
    let checked = check(&params, &model)?;
    check_passes(
        checked.passes,
        state.settings.max_explanation_passes,
        "this explanation of one image",
    )?;
    let alpha = params.alpha.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&alpha) {
        return Err(ApiError::BadRequest(format!(
            "alpha must be in [0, 1], got {alpha}"
        )));
    }
    let alpha = alpha as f32;
    let output = params.output.unwrap_or(Output::Heatmap);
    if output != Output::Json && upload.images.len() > 1 {
        return Err(ApiError::BadRequest(
            "a picture shows one image; ask for output=json for a batch".into(),
        ));
    }
    let sign = match params.sign {
        None | Some(SignParam::Absolute) => Sign::Absolute,
        Some(SignParam::Positive) => Sign::Positive,
        Some(SignParam::Negative) => Sign::Negative,
        Some(SignParam::All) => Sign::All,
    };
    // vanilla and smoothgrad keep their picture (max |gradient|) unless a
    // sign is asked for.
    let classic_picture = checked.gradient_fields && params.sign.is_none();
    let cmap = params.colormap.unwrap_or(if sign == Sign::All {
        Colormap::Rdylgn
    } else {
        Colormap::Gray
    });
    let limits = pipeline.limits;
    let deadline = state.settings.deadline();
    let (method, tunnel) = (checked.method.clone(), checked.tunnel);
    let (result, picture) = pipeline
        .on_images(upload.images, move |m, x, images| {
            let classes = vec![class; images.len()];
            let a = attribution::attribute(m, &x, &classes, &method, tunnel, Some(deadline))?;
            let input = &m.manifest.input;
            let (c, size) = (input.channels, (input.height, input.width));
            let hw = size.0 * size.1;
            let maps: Vec<Vec<f32>> = a
                .iter()
                .map(|r| {
                    if classic_picture {
                        attribution::max_abs_map(&r.values, c, hw)
                    } else {
                        attribution::visual_map(&r.values, c, hw, sign)
                    }
                })
                .collect();
            // sign=all is in [-1, 1]: the colormap's middle is 0.
            let shown: Vec<f32> = match sign {
                Sign::All if !classic_picture => maps[0].iter().map(|v| 0.5 * (v + 1.0)).collect(),
                _ => maps[0].clone(),
            };
            let picture = match output {
                Output::Json => None,
                Output::Heatmap => Some(render::encode_png(&render::heatmap(
                    &shown,
                    size,
                    (size.1 as u32, size.0 as u32),
                    cmap,
                ))),
                Output::Overlay => {
                    let original = preprocess::decode(&images[0], limits)?.to_rgb8();
                    let region =
                        preprocess::input_region(original.width(), original.height(), &m.manifest)?;
                    Some(render::encode_png(&render::overlay(
                        &original, &shown, size, region, alpha, cmap,
                    )))
                }
            };
            Ok(((a, maps), picture))
        })
        .await?;
    if let Some(png) = picture {
        return Ok(png_response(png));
    }
    let (attributions, _) = result;
    let s = &model.manifest.input;
    let (c, h, w) = (s.channels, s.height, s.width);
    let hw = h * w;
    let cube = |v: &[f32]| -> Vec<Vec<Vec<f32>>> {
        v.chunks(hw)
            .take(c)
            .map(|plane| plane.chunks(w).map(<[f32]>::to_vec).collect())
            .collect()
    };
    let grid = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(w).map(<[f32]>::to_vec).collect() };
    let results: Vec<SaliencyResult> = attributions
        .iter()
        .enumerate()
        .map(|(i, a)| SaliencyResult {
            image: i,
            class_index: a.class_index,
            label: model.classes[a.class_index].clone(),
            score: a.score,
            attributions: cube(&a.values),
            map: grid(&attribution::visual_map(&a.values, c, hw, sign)),
            convergence_delta: a.convergence_delta,
            saliency: checked
                .gradient_fields
                .then(|| grid(&attribution::max_abs_map(&a.values, c, hw))),
            gradient: checked.gradient_fields.then(|| cube(&a.values)),
        })
        .collect();
    let method = match (params.method, checked.tunnel) {
        (SaliencyMethod::Smoothgrad, _) => "smoothgrad",
        _ => checked.method.name(),
    };
    Ok(Json(SaliencyJson {
        model: model.name().to_string(),
        method,
        noise_tunnel: match params.method {
            SaliencyMethod::Smoothgrad => None,
            _ => checked.tunnel.map(|t| t.reduce.name()),
        },
        params: checked.params,
        shape: [h, w],
        first: results[0].clone(),
        results,
    })
    .into_response())
}
