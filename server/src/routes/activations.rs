//! What each layer sees: a layer's output in the real forward pass, as a PNG
//! grid of channel maps, JSON or `.npy`; and every layer at once, as a titled
//! sheet of channel-mean maps or a table of statistics.
//!
//! The pass is the model's one forward pass with a recording tap that stops
//! after the requested layer: for the `sequential` CNN_A, `conv2` is computed
//! from the max-pooled, ReLU'd `conv1` output, exactly what PyTorch's forward
//! hook sees and what the course asks students to reproduce by hand.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use candle_core::Tensor;
use model_store::inspect::activations::{self as act, LayerStats};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::pipeline::Pipeline;
use crate::render::{self, Canvas, Colormap, GridStyle, Tile};
use crate::routes::output::{Format, check_scale, npy_response, png_response};
use crate::state::AppState;

/// How maps are scaled to colours.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Each channel min-max scaled on its own: every map uses the full colour range.
    #[default]
    Channel,
    /// One min-max over all shown channels: maps compare with each other.
    Layer,
}

/// Query of `/models/{model}/activations/{layer}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LayerParams {
    /// `png` (default), `json` or `npy`.
    #[serde(default)]
    #[param(inline)]
    pub format: Format,
    /// Channels to show, e.g. `0-15` or `3,7,9` (default: all).
    pub channels: Option<String>,
    /// `gray` (default), `viridis`, `magma`, `jet`.
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// `channel` (default) or `layer`.
    #[serde(default)]
    #[param(inline)]
    pub normalize: Normalize,
    /// Integer upsampling of each value, 1-64 (default: maps grow to about 48 px).
    #[param(minimum = 1, maximum = 64)]
    pub scale: Option<u32>,
    /// Channel index above each tile (default false).
    #[serde(default)]
    pub labels: bool,
    /// Ids from `POST /inputs` (read by the image extractor).
    pub input: Option<String>,
}

/// `format=json` of one layer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LayerJson {
    /// The layer.
    pub layer: String,
    /// `[N, C, H, W]` or `[N, F]`: the batch dimension first, as a hook sees it.
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<f32>,
}

/// Query of `/models/{model}/activations`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SheetParams {
    /// `png` (default) for the sheet, `json` for the statistics (`npy` is refused).
    #[serde(default)]
    #[param(inline)]
    pub format: Format,
    /// Colormap of the sheet (default `viridis`).
    #[param(inline)]
    pub colormap: Option<Colormap>,
    /// Ids from `POST /inputs`.
    pub input: Option<String>,
}

/// `format=json` of the whole model.
#[derive(Debug, Serialize, ToSchema)]
pub struct SheetJson {
    /// The model.
    pub model: String,
    /// Every named layer in forward order.
    pub layers: Vec<LayerStats>,
}

/// Activation routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(layer_activation_get, layer_activation))
        .routes(routes!(all_activations_get, all_activations))
}

/// The named layer's output for a stored image (`?input=<id>` from `POST /inputs`).
#[utoipa::path(
    get,
    path = "/models/{model}/activations/{layer}",
    tag = "inspection",
    params(
        ("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
        ("layer" = String, Path, description = "A layer name from `GET /models/{model}`.", example = "layer1.0.conv1"),
        LayerParams,
    ),
    responses(
        (status = 200, description = "The layer's output: a PNG grid of channel maps, JSON numbers, or `.npy` (`format`).", content(
            (Binary = "image/png"), (LayerJson = "application/json"), (Binary = "application/octet-stream"))),
        ImageErrors,
    )
)]
async fn layer_activation_get(
    state: State<AppState>,
    path: ApiPath<(String, String)>,
    query: ApiQuery<LayerParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    layer_activation(state, path, query, upload).await
}

/// Every layer at once for a stored image (`?input=<id>` from `POST /inputs`).
#[utoipa::path(
    get,
    path = "/models/{model}/activations",
    tag = "inspection",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), SheetParams),
    responses(
        (status = 200, description = "Every layer: a PNG sheet of channel-mean maps, or per-layer statistics as JSON (`format`).", content(
            (Binary = "image/png"), (SheetJson = "application/json"))),
        ImageErrors,
    )
)]
async fn all_activations_get(
    state: State<AppState>,
    path: ApiPath<String>,
    query: ApiQuery<SheetParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    all_activations(state, path, query, upload).await
}

/// The named layer's output for the image(s): a grid of channel maps, JSON or npy.
#[utoipa::path(
    post,
    path = "/models/{model}/activations/{layer}",
    tag = "inspection",
    params(
        ("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"),
        ("layer" = String, Path, description = "A layer name from `GET /models/{model}`.", example = "layer1.0.conv1"),
        LayerParams,
    ),
    request_body(description = "The image(s): multipart `image` fields, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "The layer's output: a PNG grid of channel maps, JSON numbers, or `.npy` (`format`).", content(
            (Binary = "image/png"), (LayerJson = "application/json"), (Binary = "application/octet-stream"))),
        ImageErrors,
    )
)]
async fn layer_activation(
    State(state): State<AppState>,
    ApiPath((model, layer)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<LayerParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    act::check_layer(&pipeline.model, &layer)?;
    let scale = check_scale(params.scale)?;
    if params.format == Format::Png && upload.images.len() > 1 {
        return Err(ApiError::BadRequest(
            "a PNG grid shows one image; send one, or ask for format=json or format=npy for a batch".into(),
        ));
    }
    let name = layer.clone();
    let out: Tensor = pipeline
        .on_images(upload.images, move |m, x, _| {
            Ok(act::layer_output(m, &x, &name)?)
        })
        .await?;
    let act::Selected {
        shape,
        data,
        channels: indices,
    } = act::select_channels(&out, params.channels.as_deref())?;
    Ok(match params.format {
        Format::Json => Json(LayerJson { layer, shape, data }).into_response(),
        Format::Npy => npy_response(&layer, &shape, &data),
        Format::Png => {
            let style = |h, w| GridStyle {
                colormap: params.colormap.unwrap_or(Colormap::Gray),
                scale: scale.unwrap_or_else(|| render::auto_scale(h, w)),
                labels: params.labels,
            };
            let canvas = match shape[1..] {
                [c, h, w] => {
                    let maps: Vec<&[f32]> = data.chunks(h * w).take(c).collect();
                    grid_of_maps(&maps, &indices, h, w, params.normalize, style(h, w))
                }
                // A flat layer: each value a 1×1 map, a strip of cells.
                [f] => {
                    let maps: Vec<&[f32]> = data.chunks(1).take(f).collect();
                    let style = GridStyle {
                        scale: scale.unwrap_or(16),
                        ..style(1, 1)
                    };
                    grid_of_maps(&maps, &indices, 1, 1, Normalize::Layer, style)
                }
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "layer '{layer}' has output shape {shape:?}; only [C, H, W] and [F] outputs have pictures; ask for format=json"
                    )));
                }
            };
            png_response(canvas.png())
        }
    })
}

/// Every layer at once: a titled sheet of channel-mean maps, or statistics as JSON.
#[utoipa::path(
    post,
    path = "/models/{model}/activations",
    tag = "inspection",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "resnet20-cifar10"), SheetParams),
    request_body(description = "One image: a multipart `image` field, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 200, description = "Every layer: a PNG sheet of channel-mean maps, or per-layer statistics as JSON (`format`).", content(
            (Binary = "image/png"), (SheetJson = "application/json"))),
        ImageErrors,
    )
)]
async fn all_activations(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<SheetParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    if upload.images.len() > 1 {
        return Err(ApiError::BadRequest(
            "the whole-model view takes one image; ask /activations/{layer} for a batch".into(),
        ));
    }
    if params.format == Format::Npy {
        return Err(ApiError::BadRequest(
            "the whole-model view is format=png or format=json; use /activations/{layer}?format=npy for one layer".into(),
        ));
    }
    let format = params.format;
    let cmap = params.colormap.unwrap_or(Colormap::Viridis);
    let result = pipeline
        .on_images(upload.images, move |m, x, _| {
            let outputs = act::all_outputs(m, &x)?;
            let first = |t: &Tensor| t.get(0).map_err(model_store::Error::from);
            match format {
                Format::Json => {
                    let rows = outputs
                        .iter()
                        .map(|(name, t)| Ok(act::layer_stats(name, &first(t)?)?))
                        .collect::<ApiResult<Vec<_>>>()?;
                    Ok(Sheet::Stats(rows))
                }
                _ => {
                    let mut maps = Vec::with_capacity(outputs.len());
                    for (name, t) in &outputs {
                        if let Some((h, w, values)) = act::summary_map(&first(t)?)? {
                            maps.push((name.clone(), h, w, values));
                        }
                    }
                    let legend = render::Legend {
                        colormap: Some(cmap),
                        low: "min".into(),
                        high: "max".into(),
                        caption: "each layer's channel mean, from its own min to its own max"
                            .into(),
                    };
                    Ok(Sheet::Png(
                        render::with_legend(sheet(&maps, cmap), &legend).png(),
                    ))
                }
            }
        })
        .await?;
    Ok(match result {
        Sheet::Stats(layers) => Json(SheetJson {
            model: model.name().to_string(),
            layers,
        })
        .into_response(),
        Sheet::Png(bytes) => png_response(bytes),
    })
}

enum Sheet {
    Stats(Vec<LayerStats>),
    Png(Vec<u8>),
}

/// Tile width of the whole-model sheet: room for a 17-character title.
const SHEET_TILE: u32 = 136;
const SHEET_COLS: u32 = 6;
/// Height of a vector (flat layer) drawn on the sheet.
const STRIP_HEIGHT: u32 = 24;

/// Each layer's map fitted into a `SHEET_TILE` square (nearest neighbour,
/// so pixels stay visible), under its name.
fn sheet(maps: &[(String, usize, usize, Vec<f32>)], cmap: Colormap) -> Canvas {
    let n = maps.len().max(1) as u32;
    let rows = n.div_ceil(SHEET_COLS);
    let cell_h = render::LINE + SHEET_TILE + 6;
    let mut canvas = Canvas::new(SHEET_COLS * (SHEET_TILE + 6) + 6, rows * cell_h + 6);
    for (i, (name, h, w, values)) in maps.iter().enumerate() {
        let (r, c) = (i as u32 / SHEET_COLS, i as u32 % SHEET_COLS);
        let (x, y) = (6 + c * (SHEET_TILE + 6), 6 + r * cell_h);
        canvas.text(x, y, name, SHEET_TILE);
        let mut small = Canvas::new(*w as u32, *h as u32);
        small.map((0, 0), &render::min_max(values), (*h, *w), 1, cmap);
        let fit = (SHEET_TILE as f64 / (*h.max(w)) as f64).max(1e-3);
        let (tw, th) = (
            ((*w as f64) * fit).round().max(1.0) as u32,
            ((*h as f64) * fit).round().max(1.0) as u32,
        );
        // A vector is drawn as a strip tall enough to see.
        let th = if *h == 1 {
            STRIP_HEIGHT
        } else {
            th.min(SHEET_TILE)
        };
        let resized =
            image::imageops::resize(small.image(), tw, th, image::imageops::FilterType::Nearest);
        canvas.paste(x, y + render::LINE, &resized);
    }
    canvas
}

fn grid_of_maps(
    maps: &[&[f32]],
    indices: &[usize],
    h: usize,
    w: usize,
    normalize: Normalize,
    style: GridStyle,
) -> Canvas {
    let (lo, hi) = render::range(
        &maps
            .iter()
            .flat_map(|m| m.iter().copied())
            .collect::<Vec<_>>(),
    );
    let tiles: Vec<Tile> = maps
        .iter()
        .zip(indices)
        .map(|(m, &i)| Tile {
            label: i.to_string(),
            planes: vec![match normalize {
                Normalize::Channel => render::min_max(m),
                Normalize::Layer => render::scale_to(m, lo, hi),
            }],
        })
        .collect();
    let legend = match normalize {
        Normalize::Channel => render::Legend {
            colormap: Some(style.colormap),
            low: "min".into(),
            high: "max".into(),
            caption: "each channel from its own min to its own max".into(),
        },
        Normalize::Layer => render::Legend {
            colormap: Some(style.colormap),
            low: render::legend_number(lo),
            high: render::legend_number(hi),
            caption: "one range for every channel shown".into(),
        },
    };
    render::with_legend(render::grid(&tiles, h, w, style), &legend)
}
