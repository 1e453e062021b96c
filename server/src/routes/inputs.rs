//! `POST /inputs`: store an image once, fetch many layers with `?input=<id>`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use model_store::preprocess::{self, DecodeLimits};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult};
use crate::input::ImageUpload;
use crate::openapi::{Base64Images, Binary, ImageErrors, ImageForm};
use crate::state::AppState;

/// The stored image's address and what it is.
#[derive(Debug, Serialize, ToSchema)]
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
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(store))
}

/// Stores one image (checked to decode) in the content-addressed cache.
#[utoipa::path(
    post,
    path = "/inputs",
    tag = "inputs",
    request_body(description = "One image: a multipart `image` field, a raw image body, or base64 JSON.", content(
        (ImageForm = "multipart/form-data"),
        (Binary = "image/png"), (Binary = "image/jpeg"), (Binary = "image/webp"), (Binary = "image/bmp"), (Binary = "image/gif"),
        (Base64Images = "application/json"),
    )),
    responses(
        (status = 201, description = "Stored (or already there): use `input_id` as `?input=` on any inspection endpoint.", body = StoredInput,
         example = json!({"input_id": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "bytes": 2279, "width": 32, "height": 32})),
        ImageErrors,
    )
)]
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
