//! What each filter learned: a convolution's kernels as a PNG grid or numbers.
//!
//! A first layer on RGB input (3 input channels) is drawn in colour, one
//! tile per kernel, min-max scaled over the kernel's three planes together
//! so the tile shows the colour it responds to. Deeper layers have one tile
//! per output channel: the kernel of one input channel (`in_channel=N`) or
//! their mean (the default), min-max scaled per kernel.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use model_store::inspect::activations::parse_channels;
use model_store::inspect::filters::{self, NoKernels};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::render::{self, Colormap, GridStyle, Tile};
use crate::routes::activations::{Format, npy_response, png_response};
use crate::state::AppState;

/// Query of the filters endpoint.
#[derive(Debug, Deserialize)]
pub struct FilterParams {
    /// `png` (default), `json` or `npy` (the raw weights `[O, I/groups, kh, kw]`).
    #[serde(default)]
    pub format: Format,
    /// Output channels to show, e.g. `0-15` (default: all).
    pub channels: Option<String>,
    /// `mean` (default) or an input channel index; for RGB first layers,
    /// giving one draws that plane alone instead of the colour tile.
    pub in_channel: Option<String>,
    /// Colormap of single-plane tiles (default `gray`).
    pub colormap: Option<Colormap>,
    /// Integer upsampling, 1-64 (default: kernels grow to about 48 px).
    pub scale: Option<u32>,
    /// Output channel index above each tile (default false).
    #[serde(default)]
    pub labels: bool,
}

/// `format=json`.
#[derive(Debug, Serialize)]
pub struct FilterJson {
    /// The layer.
    pub layer: String,
    /// `[O, I/groups, kh, kw]` (O = the selected output channels).
    pub shape: Vec<usize>,
    /// Weights in C order.
    pub data: Vec<f32>,
}

/// `/models/{model}/filters/{layer}`.
pub fn router() -> Router<AppState> {
    Router::new().route("/models/{model}/filters/{layer}", get(layer_filters))
}

/// A convolution layer's kernels.
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
        Some(spec) => parse_channels(spec, o).map_err(ApiError::BadRequest)?,
        None => (0..o).collect(),
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
            let scale = match params.scale {
                Some(s) if !(1..=64).contains(&s) => {
                    return Err(ApiError::BadRequest(format!(
                        "scale must be an integer in 1..=64, got {s}"
                    )));
                }
                Some(s) => s,
                None => render::auto_scale(kh, kw),
            };
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
                        let p: Vec<f32> = match plane {
                            Some(n) => k[n * k2..(n + 1) * k2].to_vec(),
                            None => (0..k2)
                                .map(|j| (0..i).map(|ch| k[ch * k2 + j]).sum::<f32>() / i as f32)
                                .collect(),
                        };
                        vec![render::min_max(&p)]
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
            Ok(png_response(render::grid(&tiles, kh, kw, style).png()))
        }
    }
}
