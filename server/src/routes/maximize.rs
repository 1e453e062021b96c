//! What input excites a channel most: activation maximisation by gradient
//! ascent with jitter and total variation, deterministic for a seed.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use model_store::inspect::maximize::{self, Objective, Settings};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::{ImageUpload, prepare_batch};
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::render;
use crate::routes::output::png_response;
use crate::state::AppState;

/// Query of the maximise endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MaximizeParams {
    /// The layer whose activation to maximise (default: the last residual
    /// block or convolution); ignored when `class` is given.
    pub layer: Option<String>,
    /// The channel of `layer` (default: the mean over all channels).
    #[param(minimum = 0)]
    pub channel: Option<usize>,
    /// Maximise this class's logit instead (index or label).
    pub class: Option<String>,
    /// Gradient steps, 1 to `--max-steps` (default 64, or `--max-steps` when lower).
    #[param(minimum = 1, default = 64)]
    pub steps: Option<usize>,
    /// Step size in normalised-input units, in (0, 10] (default 0.05).
    #[param(exclusive_minimum = 0.0, maximum = 10.0, default = 0.05)]
    pub lr: Option<f64>,
    /// Seed of the starting noise and the jitter (default 0).
    #[param(minimum = 0, default = 0)]
    pub seed: Option<i64>,
    /// Largest random shift per step in pixels, 0-32 (default: 1/16 of the input size).
    #[param(minimum = 0, maximum = 32)]
    pub jitter: Option<usize>,
    /// Weight of the total-variation penalty, 0-100 (default 0.1).
    #[param(minimum = 0.0, maximum = 100.0, default = 0.1)]
    pub tv_weight: Option<f64>,
    /// Integer upsampling of the PNG, 1-16 (default: to at least 128 px).
    #[param(minimum = 1, maximum = 16)]
    pub scale: Option<u32>,
    /// `png` (default) or `json` (the objective curve and the image as base64 PNG).
    #[param(pattern = "^(png|json)$", example = "png")]
    pub format: Option<String>,
    /// Start from this image (id from `POST /inputs`) instead of noise.
    pub input: Option<String>,
}

/// A seed from the query: any non-negative 64-bit integer (signed on the
/// wire, as JSON Schema's `int64`), 0 by default.
pub(crate) fn seed(seed: Option<i64>) -> ApiResult<u64> {
    u64::try_from(seed.unwrap_or(0))
        .map_err(|_| ApiError::Unprocessable("seed must be 0 or more".into()))
}

/// `format=json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MaximizeJson {
    /// The model.
    pub model: String,
    /// The layer maximised (null for a class).
    pub layer: Option<String>,
    /// The channel (null: the whole layer or a class).
    pub channel: Option<usize>,
    /// The class maximised.
    pub class_index: Option<usize>,
    /// The objective on the starting image.
    pub start_objective: f32,
    /// The objective on the result.
    pub final_objective: f32,
    /// The objective at each step (on the jittered image, before the penalty).
    pub objective: Vec<f32>,
    /// The result at the model's input size, as a base64 PNG.
    pub image_png_base64: String,
}

/// `/models/{model}/maximize`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(maximize_get, maximize_route))
}

/// Gradient ascent on the input from seeded noise (or a stored image, `?input=<id>`).
#[utoipa::path(
    get,
    path = "/models/{model}/maximize",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), MaximizeParams),
    responses(
        (status = 200, description = "The input that excites the target most, as PNG, or the objective curve and image as JSON (`format`).", content(
            (Binary = "image/png"), (MaximizeJson = "application/json"))),
        ImageErrors,
    )
)]
async fn maximize_get(
    state: State<AppState>,
    path: ApiPath<String>,
    query: ApiQuery<MaximizeParams>,
    req: Request,
) -> ApiResult<Response> {
    maximize_route(state, path, query, req).await
}

/// Gradient ascent on the input from seeded noise or an uploaded image.
#[utoipa::path(
    post,
    path = "/models/{model}/maximize",
    tag = "gradients",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), MaximizeParams),
    request_body(description = "Optional start image instead of noise: a multipart `image` field, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "The input that excites the target most, as PNG, or the objective curve and image as JSON (`format`).", content(
            (Binary = "image/png"), (MaximizeJson = "application/json"))),
        ImageErrors,
    )
)]
async fn maximize_route(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<MaximizeParams>,
    req: Request,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    // The start image is optional: noise unless the request carries one.
    let start = if params.input.is_some() || crate::input::has_body(req.headers()) {
        let upload = ImageUpload::from_request(req, &state).await?;
        if upload.images.len() != 1 {
            return Err(ApiError::BadRequest(
                "maximize starts from at most one image".into(),
            ));
        }
        Some(upload.images)
    } else {
        None
    };
    let (settings, scale, json) = check(&params, &model, &state.settings)?;
    let objective = settings.objective.clone();
    let (result, png) = pipeline
        .compute(move |m, limits| {
            let x = match &start {
                Some(images) => Some(prepare_batch(m, images, limits)?),
                None => None,
            };
            let r = maximize::maximize(m, x.as_ref(), &settings)?;
            let png = picture(m, &r.pixels, scale);
            Ok((r, png))
        })
        .await?;
    if !json {
        return Ok(png_response(png));
    }
    let (layer, channel, class_index) = match objective {
        Objective::Class(k) => (None, None, Some(k)),
        Objective::Layer { layer, channel } => (Some(layer), channel, None),
    };
    Ok(Json(MaximizeJson {
        model: model.name().to_string(),
        layer,
        channel,
        class_index,
        start_objective: result.start,
        final_objective: result.end,
        objective: result.curve,
        image_png_base64: base64::engine::general_purpose::STANDARD.encode(png),
    })
    .into_response())
}

/// The input as a PNG: RGB for 3-channel models, grey otherwise, scaled up.
fn picture(m: &model_store::LoadedModel, pixels: &[f32], scale: u32) -> Vec<u8> {
    let s = &m.manifest.input;
    let (c, h, w) = (s.channels, s.height, s.width);
    let planes: Vec<Vec<f32>> = pixels.chunks(h * w).map(<[f32]>::to_vec).collect();
    let mut canvas = render::Canvas::new(w as u32 * scale, h as u32 * scale);
    if c == 3 {
        canvas.map_rgb((0, 0), [&planes[0], &planes[1], &planes[2]], (h, w), scale);
    } else {
        canvas.map((0, 0), &planes[0], (h, w), scale, render::Colormap::Gray);
    }
    canvas.png()
}

/// The maximisation's settings, the PNG scale and whether JSON was asked
/// for, every parameter checked against the model and the server's limits.
fn check(
    params: &MaximizeParams,
    model: &model_store::LoadedModel,
    server: &crate::settings::Settings,
) -> ApiResult<(Settings, u32, bool)> {
    let objective = match (&params.class, &params.layer) {
        (Some(c), _) => Objective::Class(model.class_index(c.trim())?),
        (None, layer) => Objective::Layer {
            layer: match layer {
                Some(l) => l.clone(),
                None => model_store::inspect::grad_cam::default_layer(model)
                    .ok_or_else(|| ApiError::BadRequest("name a layer to maximise".into()))?,
            },
            channel: params.channel,
        },
    };
    maximize::check(model, &objective)?;
    let max_steps = server.max_steps;
    // The default never exceeds the server's limit.
    let steps = params.steps.unwrap_or(64.min(max_steps));
    if !(1..=max_steps).contains(&steps) {
        return Err(ApiError::BadRequest(format!(
            "steps must be in 1..={max_steps} (--max-steps), got {steps}"
        )));
    }
    let lr = params.lr.unwrap_or(0.05);
    if !(lr > 0.0 && lr <= 10.0) {
        return Err(ApiError::BadRequest(format!(
            "lr must be in (0, 10], got {lr}"
        )));
    }
    let tv_weight = params.tv_weight.unwrap_or(0.1);
    if !(0.0..=100.0).contains(&tv_weight) {
        return Err(ApiError::BadRequest(format!(
            "tv_weight must be in [0, 100], got {tv_weight}"
        )));
    }
    let input = &model.manifest.input;
    let jitter = params
        .jitter
        .unwrap_or((input.height.min(input.width) / 16).max(1));
    if jitter > 32 {
        return Err(ApiError::BadRequest(format!(
            "jitter must be in 0..=32 pixels, got {jitter}"
        )));
    }
    let scale = match params.scale {
        Some(s @ 1..=16) => s,
        Some(s) => {
            return Err(ApiError::BadRequest(format!(
                "scale must be in 1..=16, got {s}"
            )));
        }
        None => (128 / input.height.max(input.width).max(1)).clamp(1, 16) as u32,
    };
    let json = match params.format.as_deref() {
        None | Some("png") => false,
        Some("json") => true,
        Some(f) => {
            return Err(ApiError::BadRequest(format!(
                "format must be png or json, got {f:?}"
            )));
        }
    };
    let settings = Settings {
        objective,
        steps,
        lr: lr as f32,
        seed: seed(params.seed)?,
        jitter,
        tv_weight: tv_weight as f32,
        deadline: Some(server.deadline()),
    };
    Ok((settings, scale, json))
}
