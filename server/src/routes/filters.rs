//! What each filter learned: a convolution's kernels as a PNG grid or numbers.
//!
//! A first layer on RGB input (3 input channels) is drawn in colour, one
//! tile per kernel, min-max scaled over the kernel's three planes together
//! so the tile shows the colour it responds to. Deeper layers have one tile
//! per output channel: the kernel of one input channel (`in_channel=N`) or
//! their mean (the default), min-max scaled per kernel.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use model_store::inspect::activations::parse_channels;
use model_store::inspect::filters::{self, NoKernels};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::openapi::{Binary, LookupErrors};
use crate::render::{self, Colormap, GridStyle, Tile};
use crate::routes::output::{Format, check_scale, npy_response, png_response};
use crate::state::AppState;

/// Query of the filters endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FilterParams {
    /// `png` (default), `json` or `npy` (the raw weights `[O, I/groups, kh, kw]`).
    #[serde(default)]
    #[param(inline)]
    pub format: Format,
    /// Output channels to show, e.g. `0-15` (default: all).
    pub channels: Option<String>,
    /// `mean` (default) or an input channel index; for RGB first layers,
    /// giving one draws that plane alone instead of the colour tile.
    #[param(example = "mean")]
    pub in_channel: Option<String>,
    /// Colormap of single-plane tiles (default `gray`).
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// Integer upsampling, 1-64 (default: kernels grow to about 48 px).
    #[param(minimum = 1, maximum = 64)]
    pub scale: Option<u32>,
    /// Output channel index above each tile (default false).
    #[serde(default)]
    pub labels: bool,
}

/// `format=json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct FilterJson {
    /// The layer.
    pub layer: String,
    /// `[O, I/groups, kh, kw]` (O = the selected output channels).
    pub shape: Vec<usize>,
    /// Weights in C order.
    pub data: Vec<f32>,
}

/// `/models/{model}/filters/{layer}`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(layer_filters))
}

/// A convolution layer's kernels.
#[utoipa::path(
    get,
    path = "/models/{model}/filters/{layer}",
    tag = "inspection",
    params(
        ("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
        ("layer" = String, Path, description = "A convolution layer from `GET /models/{model}`.", example = "conv1"),
        FilterParams,
    ),
    responses(
        (status = 200, description = "The kernels: a PNG grid, JSON weights, or `.npy` (`format`).", content(
            (Binary = "image/png"), (FilterJson = "application/json"), (Binary = "application/octet-stream"))),
        LookupErrors,
    )
)]
async fn layer_filters(
    State(state): State<AppState>,
    ApiPath((model, layer)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<FilterParams>,
) -> ApiResult<Response> {
    let model = state.model(&model)?;
    let weight = filters::kernels(&model, &layer).map_err(|e| match e {
        NoKernels::Unknown(e) => ApiError::from(e),
        NoKernels::NotConv { kind, conv_layers } => ApiError::BadRequest(format!(
            "layer '{layer}' is a {kind} and has no kernels; convolution layers: {}",
            conv_layers.join(", ")
        )),
    })?;
    let (dims, data) = filters::to_host(&weight)?;
    let (o, i, kh, kw) = (dims[0], dims[1], dims[2], dims[3]);
    let per_kernel = i * kh * kw;
    let selection: Vec<usize> = match &params.channels {
        Some(spec) => parse_channels(spec, o)?,
        None => (0..o).collect(),
    };
    // Every parameter is checked whatever the format, so a bad one is
    // refused the same way for PNG, JSON and npy.
    let scale = check_scale(params.scale)?;
    let plane = match params.in_channel.as_deref() {
        None | Some("mean") => None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n < i => Some(n),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "in_channel must be `mean` or an input channel in 0..{i}, got {n:?}"
                )));
            }
        },
    };
    let kernel = |c: usize| &data[c * per_kernel..(c + 1) * per_kernel];
    match params.format {
        Format::Json | Format::Npy => {
            let data: Vec<f32> = selection
                .iter()
                .flat_map(|&c| kernel(c).iter().copied())
                .collect();
            let shape = vec![selection.len(), i, kh, kw];
            Ok(if params.format == Format::Json {
                Json(FilterJson { layer, shape, data }).into_response()
            } else {
                npy_response(&layer, &shape, &data)
            })
        }
        Format::Png => {
            let scale = scale.unwrap_or_else(|| render::auto_scale(kh, kw));
            let k2 = kh * kw;
            let tiles: Vec<Tile> = selection
                .iter()
                .map(|&c| {
                    let k = kernel(c);
                    let planes = if i == 3 && plane.is_none() {
                        // Colour: one min-max over all three planes keeps their balance.
                        let scaled = render::min_max(k);
                        scaled.chunks(k2).map(<[f32]>::to_vec).collect()
                    } else {
                        vec![render::min_max(&filters::kernel_plane(k, i, plane))]
                    };
                    Tile {
                        label: c.to_string(),
                        planes,
                    }
                })
                .collect();
            let style = GridStyle {
                colormap: params.colormap.unwrap_or(Colormap::Gray),
                scale,
                labels: params.labels,
            };
            let legend = if i == 3 && plane.is_none() {
                render::Legend {
                    colormap: None,
                    low: String::new(),
                    high: String::new(),
                    caption: "RGB: each kernel's three planes from their min to their max".into(),
                }
            } else {
                render::Legend {
                    colormap: Some(style.colormap),
                    low: "min".into(),
                    high: "max".into(),
                    caption: "each kernel from its own min to its own max".into(),
                }
            };
            Ok(png_response(
                render::with_legend(render::grid(&tiles, kh, kw, style), &legend).png(),
            ))
        }
    }
}
