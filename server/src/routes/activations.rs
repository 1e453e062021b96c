//! A layer's output in the real forward pass, as numbers.
//!
//! The pass is the model's one forward pass with a recording tap that stops
//! after the requested layer: for a `sequential` CNN_A, `conv2` is computed
//! from the max-pooled, ReLU'd `conv1` output, exactly as PyTorch's forward
//! hook sees it. `format=json` gives `{"layer","shape","data"}` (C order, the
//! batch dimension first, as a hook would see it) and `format=npy` a NumPy file.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use model_store::preprocess::DecodeLimits;
use model_store::{Error as StoreError, Record};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::{ImageUpload, prepare_batch};
use crate::state::AppState;

/// Output formats available now.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"layer","shape","data"}`.
    Json,
    /// A NumPy `.npy` file, little-endian float32.
    Npy,
    /// A PNG grid of channel maps.
    Png,
}

/// Query of the activations endpoint.
#[derive(Debug, Deserialize)]
pub struct ActivationParams {
    /// `json` or `npy`.
    pub format: Option<Format>,
}

/// `format=json`.
#[derive(Debug, Serialize)]
pub struct ActivationJson {
    /// The layer.
    pub layer: String,
    /// `[N, C, H, W]` or `[N, F]`.
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<f32>,
}

/// Activation routes.
pub fn router() -> Router<AppState> {
    Router::new().route(
        "/models/{model}/activations/{layer}",
        post(layer_activation),
    )
}

/// The named layer's output for the posted image(s).
async fn layer_activation(
    State(state): State<AppState>,
    ApiPath((model, layer)): ApiPath<(String, String)>,
    ApiQuery(params): ApiQuery<ActivationParams>,
    upload: ImageUpload,
) -> ApiResult<Response> {
    let model = state.model(&model)?;
    if model.network.layer(&layer).is_none() {
        return Err(StoreError::UnknownLayer {
            model: model.name().to_string(),
            layer,
            known: model
                .network
                .layers()
                .iter()
                .map(|l| l.name.clone())
                .collect(),
        }
        .into());
    }
    let format = match params.format {
        Some(f @ (Format::Json | Format::Npy)) => f,
        Some(Format::Png) | None => {
            return Err(ApiError::BadRequest(
                "PNG activation grids are not served yet; ask for format=json or format=npy".into(),
            ));
        }
    };
    let limits = DecodeLimits {
        max_pixels: state.settings.max_pixels,
    };
    let m = model.clone();
    let name = layer.clone();
    let (shape, data) = state
        .compute
        .run(move || {
            let x = prepare_batch(&m, &upload.images, limits)?;
            let mut tap = Record::layers([name.as_str()]);
            m.network.forward(&x, &mut tap)?;
            let t = tap
                .get(&name)
                .ok_or_else(|| ApiError::Internal(format!("layer {name} produced no output")))?;
            let data = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(StoreError::from)?;
            Ok((t.dims().to_vec(), data))
        })
        .await?;
    Ok(match format {
        Format::Npy => {
            let mut resp = npy(&shape, &data).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!(
                "attachment; filename=\"{}.npy\"",
                layer.replace('"', "")
            )) {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        _ => Json(ActivationJson { layer, shape, data }).into_response(),
    })
}

/// A version-1.0 `.npy` file of little-endian float32 values.
pub fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + header length (2) + header, padded with
    // spaces and ended by a newline to a multiple of 64 bytes.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let bytes = npy(&[2, 3], &[0.0; 6]);
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"));
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + len + 24);
    }
}
