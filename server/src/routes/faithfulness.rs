//! How faithful explanations are: several methods' maps of the same images
//! scored by deletion, insertion, ROAD and the confidence metrics, as JSON
//! or a plot of the curves.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::LoadedModel;
use model_store::inspect::faithfulness::{
    self, DeletionBaseline, Explainer, METRICS, Metric, Options,
};
use model_store::inspect::grad_cam;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::charts::faithfulness::{FaithfulnessChart, MethodCurves};
use crate::charts::{self, ChartParams};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::routes::gradcam::query_plus;
use crate::routes::output::json_or_png;
use crate::routes::saliency::{self, SaliencyMethod, SaliencyParams};
use crate::state::AppState;

/// The most deletion and insertion steps one request may ask for.
pub const MAX_STEPS: usize = 100;

/// Query of the faithfulness endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FaithfulnessParams {
    /// Methods to score, comma-separated: any of `/gradcam`'s
    /// (`gradcam`, `gradcam++`, …) or `/saliency`'s (`vanilla`,
    /// `integrated_gradients`, …), with their default parameters (default `gradcam`).
    #[param(example = "gradcam,integrated_gradients,occlusion")]
    pub methods: Option<String>,
    /// Metrics, comma-separated: `deletion`, `insertion`, `road_morf`,
    /// `road_lerf`, `drop_in_confidence`, `increase_in_confidence` (default: all).
    #[param(example = "deletion,insertion")]
    pub metrics: Option<String>,
    /// Class index or label (default: the predicted class of each image).
    pub class: Option<String>,
    /// Deletion and insertion steps, 1-100 (default 20).
    #[param(minimum = 1, maximum = 100, default = 20)]
    pub steps: Option<usize>,
    /// The Grad-CAM family's layer (and guided Grad-CAM's; default: `/gradcam`'s).
    pub layer: Option<String>,
    /// What deletion replaces pixels with: `zero` (zeros in the normalised
    /// input space, default) or `blur` (Gaussian, σ = 5 px).
    pub baseline: Option<String>,
    /// `json` (default) or `png`: the deletion and insertion curves of the first image.
    pub format: Option<String>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// One image's scores.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FaithfulnessResult {
    /// Which image of the request.
    pub image: usize,
    /// The class the maps explain.
    pub class_index: usize,
    /// Its label.
    pub label: String,
    /// Its softmax probability on the image.
    pub probability: f32,
    /// `{method: {metric: score}}`.
    pub scores: BTreeMap<String, BTreeMap<String, f32>>,
    /// `{method: {"deletion" | "insertion": [probability at each fraction]}}`.
    pub curves: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
}

/// The JSON answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct FaithfulnessJson {
    /// The model.
    pub model: String,
    /// The methods, as asked.
    pub methods: Vec<String>,
    /// The metrics, as asked.
    pub metrics: Vec<&'static str>,
    /// Deletion and insertion steps.
    pub steps: usize,
    /// The fraction of pixels at each point of a curve: `i / steps`.
    pub fractions: Vec<f32>,
    /// The Grad-CAM family's layer (null when the model has none and no
    /// method needs one).
    pub layer: Option<String>,
    /// Deletion's baseline.
    pub baseline: &'static str,
    /// The first image's scores.
    #[serde(flatten)]
    pub first: FaithfulnessResult,
    /// Every image's.
    pub results: Vec<FaithfulnessResult>,
}

/// `/models/{model}/faithfulness`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(faithfulness))
}

/// The Grad-CAM family's layer: the one asked for, else `/gradcam`'s
/// default (`None` when the model has no spatial layer: fine for
/// attributions alone).
pub(crate) fn cam_layer(model: &LoadedModel, asked: Option<&str>) -> ApiResult<Option<String>> {
    match asked {
        Some(l) => {
            grad_cam::check_layer(model, l)?;
            Ok(Some(l.to_string()))
        }
        None => Ok(grad_cam::default_layer(model)),
    }
}

/// The methods of a comma-separated list, each with its defaults.
pub(crate) fn explainers(
    list: &str,
    model: &LoadedModel,
    layer: Option<&str>,
) -> ApiResult<Vec<(String, Explainer)>> {
    let mut out: Vec<(String, Explainer)> = Vec::new();
    let needs_layer = |name: &str| -> ApiResult<String> {
        layer.map(str::to_string).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{name} needs a layer with a spatial output, and model '{}' has none",
                model.name()
            ))
        })
    };
    for raw in list.split(',') {
        let name = query_plus(raw);
        if name.is_empty() || out.iter().any(|(n, _)| n == name) {
            continue;
        }
        let explainer = if let Some(method) = grad_cam::Method::parse(name) {
            Explainer::Cam {
                method,
                layer: needs_layer(name)?,
            }
        } else if let Ok(method) =
            serde_json::from_value::<SaliencyMethod>(serde_json::Value::String(name.into()))
        {
            let layer = match method {
                SaliencyMethod::GuidedGradcam => Some(needs_layer(name)?),
                _ => None,
            };
            let params = SaliencyParams {
                method,
                layer,
                ..SaliencyParams::default()
            };
            let checked = saliency::check(&params, model)?;
            Explainer::Attribution {
                method: checked.method,
                tunnel: checked.tunnel,
            }
        } else {
            return Err(ApiError::BadRequest(format!(
                "unknown method {name:?}; choose from {} (Grad-CAM family) or {} (attributions)",
                grad_cam::METHODS.map(grad_cam::Method::name).join(", "),
                saliency::METHOD_NAMES.join(", ")
            )));
        };
        out.push((name.to_string(), explainer));
    }
    if out.is_empty() {
        return Err(ApiError::BadRequest(
            "methods is empty; name at least one, e.g. methods=gradcam".into(),
        ));
    }
    Ok(out)
}

fn metrics(list: Option<&str>) -> ApiResult<Vec<Metric>> {
    let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
        return Ok(METRICS.to_vec());
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let m = Metric::parse(name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown metric {name:?}; choose from {}",
                METRICS.map(Metric::name).join(", ")
            ))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Scores explanations of each image.
#[utoipa::path(
    post,
    path = "/models/{model}/faithfulness",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), FaithfulnessParams),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "Scores per method and metric, with the deletion and insertion curves (JSON), or a plot of the curves (`format=png`).", content(
            (FaithfulnessJson = "application/json"), (Binary = "image/png"))),
        ImageErrors,
    )
)]
async fn faithfulness(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<FaithfulnessParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    let layer = cam_layer(&model, params.layer.as_deref())?;
    let methods = explainers(
        params.methods.as_deref().unwrap_or("gradcam"),
        &model,
        layer.as_deref(),
    )?;
    let metrics = metrics(params.metrics.as_deref())?;
    let steps = params.steps.unwrap_or(20);
    if !(1..=MAX_STEPS).contains(&steps) {
        return Err(ApiError::BadRequest(format!(
            "steps must be in 1..={MAX_STEPS}, got {steps}"
        )));
    }
    let passes: usize = methods
        .iter()
        .map(|(_, e)| e.passes(&model) + faithfulness::metric_passes(&metrics, steps))
        .sum();
    saliency::check_passes(
        passes,
        state.settings.max_explanation_passes,
        "this report of one image",
    )?;
    let (baseline, baseline_name) = match params.baseline.as_deref() {
        None | Some("zero") => (DeletionBaseline::Zero, "zero"),
        Some("blur") => (DeletionBaseline::Blur, "blur"),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "baseline must be zero or blur, got {other:?}"
            )));
        }
    };
    let png = json_or_png(params.format.as_deref())?;
    let class = pipeline.class(params.class.as_deref())?;
    let options = Options {
        steps,
        baseline,
        deadline: Some(state.settings.deadline()),
    };
    let jobs: Vec<Explainer> = methods.iter().map(|(_, e)| e.clone()).collect();
    let ms = metrics.clone();
    let results = pipeline
        .on_images(upload.images, move |m, x, _| {
            Ok(faithfulness::report(m, &x, class, &jobs, &ms, options)?)
        })
        .await?;
    let results: Vec<FaithfulnessResult> = results
        .into_iter()
        .enumerate()
        .map(|(image, r)| {
            let mut scores = BTreeMap::new();
            let mut curves = BTreeMap::new();
            for ((method, _), list) in methods.iter().zip(r.scores) {
                let method = method.clone();
                let mut s = BTreeMap::new();
                let mut c = BTreeMap::new();
                for score in list {
                    s.insert(score.metric.name().to_string(), score.value);
                    if let Some(curve) = score.curve {
                        c.insert(score.metric.name().to_string(), curve);
                    }
                }
                scores.insert(method.clone(), s);
                if !c.is_empty() {
                    curves.insert(method, c);
                }
            }
            FaithfulnessResult {
                image,
                class_index: r.class_index,
                label: model.classes[r.class_index].clone(),
                probability: r.probability,
                scores,
                curves,
            }
        })
        .collect();
    let names: Vec<String> = methods.into_iter().map(|(n, _)| n).collect();
    if png {
        let first = &results[0];
        let curve = |method: &str, metric: &str| {
            first
                .curves
                .get(method)
                .and_then(|c| c.get(metric))
                .map(|ys| {
                    let area = first.scores[method][metric];
                    (ys.clone(), area)
                })
        };
        let chart = FaithfulnessChart {
            title: format!(
                "{}: {} (p = {:.3})",
                model.name(),
                first.label,
                first.probability
            ),
            methods: names
                .iter()
                .map(|m| MethodCurves {
                    method: m.clone(),
                    deletion: curve(m, "deletion"),
                    insertion: curve(m, "insertion"),
                })
                .collect(),
        };
        if chart
            .methods
            .iter()
            .all(|m| m.deletion.is_none() && m.insertion.is_none())
        {
            return Err(ApiError::BadRequest(
                "format=png plots the deletion and insertion curves; ask for one of those metrics"
                    .into(),
            ));
        }
        let drawn = charts::render(&chart, &ChartParams::default(), charts::Format::Png)?;
        return Ok(crate::routes::output::png_response(drawn.bytes));
    }
    Ok(Json(FaithfulnessJson {
        model: model.name().to_string(),
        methods: names,
        metrics: metrics.iter().map(|m| m.name()).collect(),
        steps,
        fractions: (0..=steps).map(|i| i as f32 / steps as f32).collect(),
        layer,
        baseline: baseline_name,
        first: results[0].clone(),
        results,
    })
    .into_response())
}
