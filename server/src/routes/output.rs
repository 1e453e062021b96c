//! How a result goes back, shared by every route that draws or exports:
//! the `format` and `output` choices, PNG and `.npy` responses, the PNG
//! scale bound.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::render;

/// Output formats.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A PNG picture (the default).
    #[default]
    Png,
    /// Numbers as JSON.
    Json,
    /// A NumPy `.npy` file, little-endian float32.
    Npy,
}

/// `format=json` (the default) or `format=png`: whether a PNG is asked for.
pub fn json_or_png(format: Option<&str>) -> ApiResult<bool> {
    match format {
        None | Some("json") => Ok(false),
        Some("png") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "format must be json or png, got {other:?}"
        ))),
    }
}

/// What comes back.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// The heatmap blended onto the uploaded image, at its own size (default).
    #[default]
    Overlay,
    /// The heatmap alone, at the model's input size.
    Heatmap,
    /// The numbers.
    Json,
}

/// `scale` (integer upsampling of PNG grids), bounded.
pub(crate) fn check_scale(scale: Option<u32>) -> ApiResult<Option<u32>> {
    match scale {
        Some(s) if !(1..=64).contains(&s) => Err(ApiError::BadRequest(format!(
            "scale must be an integer in 1..=64, got {s}"
        ))),
        other => Ok(other),
    }
}

/// An `image/png` response.
pub fn png_response(bytes: Vec<u8>) -> Response {
    let mut resp = bytes.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    resp
}

/// A chart: PNG or SVG, with its content type.
pub fn chart_response(chart: crate::charts::Drawn) -> Response {
    let mut resp = chart.bytes.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(chart.content_type),
    );
    resp
}

/// An `.npy` download.
pub fn npy_response(name: &str, shape: &[usize], data: &[f32]) -> Response {
    let mut resp = render::npy(shape, data).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let safe: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}.npy\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}
