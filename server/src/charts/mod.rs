//! Charts drawn with plotters: the training curves of a job, the
//! confusion matrix of an evaluation and the deletion and insertion curves
//! of explanations, as PNG (plotters' bitmap backend) or
//! SVG (its SVG backend), with text in the bundled DejaVu Sans.
//!
//! A chart says what it draws at a given scale on any plotters backend
//! ([`Chart::draw`]); [`render`] picks the backend and the size the request
//! asked for. Sizes are bounded ([`MAX_SIDE`]) so a query cannot ask for a
//! gigapixel canvas.

pub mod confusion;
pub mod faithfulness;
pub mod font;
pub mod training;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::ApiError;

/// Largest width or height of a chart, in pixels, after `scale`.
pub const MAX_SIDE: u32 = 4096;
/// Smallest width or height a chart can be asked for (before `scale`).
pub const MIN_SIDE: u32 = 200;
/// Largest `scale`.
pub const MAX_SCALE: f64 = 4.0;

/// A chart's drawing: the same code for every backend.
pub trait Chart {
    /// Width and height at scale 1 when the request names none.
    fn default_size(&self) -> (u32, u32);

    /// Draws onto `root` (already white), with text and strokes `scale`
    /// times their size at scale 1.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
        scale: f64,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>;
}

/// The query of every chart endpoint.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChartParams {
    /// Width in pixels at scale 1 (200-4096; default: the chart's own).
    #[param(minimum = 200, maximum = 4096, example = 1000)]
    pub width: Option<u32>,
    /// Height in pixels at scale 1 (200-4096; default: the chart's own).
    #[param(minimum = 200, maximum = 4096, example = 400)]
    pub height: Option<u32>,
    /// Multiplies the size, the text and the lines (0.5-4; default 1): 2 is a
    /// slide at twice the pixel density. Width and height after it stay at most 4096.
    #[param(minimum = 0.5, maximum = 4.0, example = 2)]
    pub scale: Option<f64>,
}

/// PNG or SVG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `image/png`.
    Png,
    /// `image/svg+xml`.
    Svg,
}

/// A drawn chart and its content type.
pub struct Drawn {
    /// The file.
    pub bytes: Vec<u8>,
    /// `image/png` or `image/svg+xml`.
    pub content_type: &'static str,
}

/// The pixel size and scale a request asks for, checked against the bounds.
pub fn size(params: &ChartParams, default: (u32, u32)) -> Result<(u32, u32, f64), ApiError> {
    let scale = params.scale.unwrap_or(1.0);
    if !(0.5..=MAX_SCALE).contains(&scale) {
        return Err(ApiError::BadRequest(format!(
            "scale must be between 0.5 and {MAX_SCALE}, got {scale}"
        )));
    }
    let side = |name: &str, v: Option<u32>, d: u32| -> Result<u32, ApiError> {
        let v = v.unwrap_or(d);
        if !(MIN_SIDE..=MAX_SIDE).contains(&v) {
            return Err(ApiError::BadRequest(format!(
                "{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {v}"
            )));
        }
        let scaled = (v as f64 * scale).round();
        if scaled > MAX_SIDE as f64 {
            return Err(ApiError::BadRequest(format!(
                "{name} {v} at scale {scale} is {scaled} pixels; the most is {MAX_SIDE}"
            )));
        }
        Ok(scaled as u32)
    };
    // A chart's own size is fitted into the bounds at this scale: only a
    // size the request names can be refused.
    let fit = |d: u32| {
        (d as f64)
            .min(MAX_SIDE as f64 / scale)
            .floor()
            .max(MIN_SIDE as f64) as u32
    };
    Ok((
        side("width", params.width, fit(default.0))?,
        side("height", params.height, fit(default.1))?,
        scale,
    ))
}

/// Draws `chart` at the requested size in `format`.
pub fn render(chart: &impl Chart, params: &ChartParams, format: Format) -> Result<Drawn, ApiError> {
    font::register();
    let (w, h, scale) = size(params, chart.default_size())?;
    let failed = |e: String| ApiError::Internal(format!("drawing a chart failed: {e}"));
    match format {
        Format::Png => {
            let mut buf = vec![255u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
                chart
                    .draw(&root, scale)
                    .map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            let img = image::RgbImage::from_raw(w, h, buf).expect("the buffer is w × h × 3");
            Ok(Drawn {
                bytes: crate::render::encode_png(&img),
                content_type: "image/png",
            })
        }
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
                root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
                chart
                    .draw(&root, scale)
                    .map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            Ok(Drawn {
                bytes: svg.into_bytes(),
                content_type: "image/svg+xml",
            })
        }
    }
}

/// The text style of charts: DejaVu Sans at `px` pixels times `scale`.
pub fn text(px: f64, scale: f64) -> TextStyle<'static> {
    (font::FAMILY, px * scale).into_font().into()
}

/// matplotlib's tab10 colours, for series.
pub const SERIES: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
