//! `POST /inputs`: store an image once, fetch many layers with `?input=<id>`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use model_store::preprocess::{self, DecodeLimits};
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use crate::input::ImageUpload;
use crate::state::AppState;

/// The stored image's address and what it is.
#[derive(Debug, Serialize)]
pub struct StoredInput {
    /// SHA-256 of the bytes, lowercase hex: use as `?input=`.
    pub input_id: String,
    /// Size of the stored file.
    pub bytes: usize,
    /// Pixels.
    pub width: u32,
    /// Pixels.
    pub height: u32,
}

/// `/inputs`.
pub fn router() -> Router<AppState> {
    Router::new().route("/inputs", post(store))
}

/// Stores one image (checked to decode) in the content-addressed cache.
async fn store(
    State(state): State<AppState>,
    upload: ImageUpload,
) -> ApiResult<(StatusCode, Json<StoredInput>)> {
    if upload.images.len() != 1 {
        return Err(ApiError::BadRequest(format!(
            "send one image per POST /inputs, not {}",
            upload.images.len()
        )));
    }
    let bytes = upload.images.into_iter().next().unwrap_or_default();
    let limits = DecodeLimits {
        max_pixels: state.settings.max_pixels,
    };
    let b = bytes.clone();
    let (width, height) = state
        .compute
        .run(move || {
            let img = preprocess::decode(&b, limits)?;
            Ok((img.width(), img.height()))
        })
        .await?;
    let len = bytes.len();
    let input_id = state.inputs.insert(bytes).ok_or_else(|| {
        ApiError::TooLarge(format!(
            "the image is {len} bytes, more than the whole inputs cache ({} bytes, --inputs-cache-bytes)",
            state.inputs.max_bytes()
        ))
    })?;
    Ok((
        StatusCode::CREATED,
        Json(StoredInput {
            input_id,
            bytes: len,
            width,
            height,
        }),
    ))
}
