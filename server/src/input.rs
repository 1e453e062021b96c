//! Images in a request, in any of the contract's forms: multipart `image`
//! fields (repeat for a batch, `label` fields pair with them in order), a raw
//! `image/*` body, or JSON with base64 (`{"image": ...}`, `{"images": [...]}`
//! or `{"items": [{"image": ..., "label": ...}]}`).
//!
//! Every inspection endpoint also takes `?input=<id>` (comma-separated ids
//! for a batch) naming images stored with `POST /inputs`; a GET has no body,
//! so that is its only way.
//!
//! A body without a usable content type (curl's `--data-binary` sends
//! `application/x-www-form-urlencoded`) is accepted when its bytes are an
//! image; anything else gets a 415 that says how to send one.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use base64::Engine;
use candle_core::Tensor;
use model_store::LoadedModel;
use model_store::preprocess::{self, DecodeLimits};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::extract::{body_error, declared_within};
use crate::state::AppState;

/// Raw image types the contract accepts as a whole body.
const IMAGE_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    "image/bmp",
    "image/gif",
];

/// Whether a request carries a body (a non-zero length, or chunks).
pub fn has_body(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() != "0")
        || headers.contains_key(axum::http::header::TRANSFER_ENCODING)
}

/// The images of a request, undecoded, with optional labels.
#[derive(Debug, Default)]
pub struct ImageUpload {
    /// Encoded image files, in request order.
    pub images: Vec<Bytes>,
    /// Labels in request order (multipart `label` fields or JSON `label`).
    pub labels: Vec<String>,
}

impl FromRequest<AppState> for ImageUpload {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        #[derive(serde::Deserialize)]
        struct InputQuery {
            input: Option<String>,
        }
        let cached = axum::extract::Query::<InputQuery>::try_from_uri(req.uri())
            .ok()
            .and_then(|q| q.0.input);
        if let Some(ids) = cached {
            if has_body(req.headers()) {
                return Err(ApiError::BadRequest(
                    "give the image either as ?input=<id> or in the body, not both".into(),
                ));
            }
            let mut upload = ImageUpload::default();
            for id in ids.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let found = state.inputs.get(id);
                let counter = if found.is_some() {
                    &state.metrics.inputs_hits
                } else {
                    &state.metrics.inputs_misses
                };
                counter.inc();
                upload.images.push(found.ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "input '{id}' is not in the inputs cache; POST the image to /inputs first (the cache keeps the most recently used {} MiB)",
                        state.inputs.max_bytes() / (1024 * 1024)
                    ))
                })?);
            }
            return check_count(upload, state);
        }
        if req.method() == axum::http::Method::GET {
            return Err(ApiError::BadRequest(
                "a GET names its image with ?input=<id> (from POST /inputs); or POST the image itself".into(),
            ));
        }
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        declared_within(
            req.headers(),
            state.settings.max_body_bytes,
            "--max-body-bytes",
        )?;
        let upload = if mime == "multipart/form-data" {
            from_multipart(Multipart::from_request(req, state).await.map_err(|e| {
                ApiError::BadRequest(format!("malformed multipart body: {}", e.body_text()))
            })?)
            .await?
        } else {
            let body = Bytes::from_request(req, state)
                .await
                .map_err(|e| body_error(e.status(), e.body_text()))?;
            if mime == "application/json" {
                from_json(&body)?
            } else if IMAGE_TYPES.contains(&mime.as_str()) || preprocess::looks_like_image(&body) {
                ImageUpload {
                    images: vec![body],
                    labels: Vec::new(),
                }
            } else {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "cannot read an image from a body of type {:?}; send a PNG/JPEG/WebP/BMP/GIF body with its image/* Content-Type, a multipart form with an `image` field (curl -F image=@file.png), or JSON {{\"image\": \"<base64>\"}}",
                    if mime.is_empty() { "(none)" } else { &mime }
                )));
            }
        };
        check_count(upload, state)
    }
}

fn check_count(upload: ImageUpload, state: &AppState) -> ApiResult<ImageUpload> {
    if upload.images.is_empty() {
        return Err(ApiError::BadRequest(
            "no image in the request: add a multipart field `image` (repeat it for a batch), or send the image as the body".into(),
        ));
    }
    if upload.images.len() > state.settings.max_batch {
        return Err(ApiError::TooLarge(format!(
            "{} images in one request; the limit is {} (--max-batch)",
            upload.images.len(),
            state.settings.max_batch
        )));
    }
    Ok(upload)
}

async fn from_multipart(mut multipart: Multipart) -> ApiResult<ImageUpload> {
    let mut upload = ImageUpload::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| body_error(e.status(), e.body_text()))?
    {
        match field.name().unwrap_or("") {
            "image" | "image[]" | "images" => upload.images.push(
                field
                    .bytes()
                    .await
                    .map_err(|e| body_error(e.status(), e.body_text()))?,
            ),
            "label" | "label[]" | "labels" => upload.labels.push(
                field
                    .text()
                    .await
                    .map_err(|e| body_error(e.status(), e.body_text()))?,
            ),
            // Unknown fields are ignored, as unknown JSON keys are.
            _ => {}
        }
    }
    Ok(upload)
}

fn from_json(body: &[u8]) -> ApiResult<ImageUpload> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    let mut upload = ImageUpload::default();
    let decode = |v: &Value, at: &str| -> ApiResult<Bytes> {
        let s = v
            .as_str()
            .ok_or_else(|| ApiError::Unprocessable(format!("`{at}` must be a base64 string")))?;
        // Accept data URLs as a browser would produce them.
        let s = s.split_once(";base64,").map_or(s, |(_, b)| b);
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map(Bytes::from)
            .map_err(|e| ApiError::Unprocessable(format!("`{at}` is not valid base64: {e}")))
    };
    if let Some(v) = value.get("image") {
        upload.images.push(decode(v, "image")?);
        if let Some(l) = value.get("label").and_then(Value::as_str) {
            upload.labels.push(l.to_string());
        }
    }
    if let Some(list) = value.get("images").and_then(Value::as_array) {
        for (i, v) in list.iter().enumerate() {
            upload.images.push(decode(v, &format!("images[{i}]"))?);
        }
    }
    if let Some(items) = value.get("items").and_then(Value::as_array) {
        for (i, item) in items.iter().enumerate() {
            let img = item
                .get("image")
                .ok_or_else(|| ApiError::Unprocessable(format!("items[{i}] has no `image`")))?;
            upload
                .images
                .push(decode(img, &format!("items[{i}].image"))?);
            if let Some(l) = item.get("label") {
                upload.labels.push(match l {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
    }
    Ok(upload)
}

/// Decodes and preprocesses every image for `model` into one batch tensor.
/// Errors name the image by its position in the request.
pub fn prepare_batch(
    model: &LoadedModel,
    images: &[Bytes],
    limits: DecodeLimits,
) -> ApiResult<Tensor> {
    let many = images.len() > 1;
    let mut inputs = Vec::with_capacity(images.len());
    for (i, bytes) in images.iter().enumerate() {
        let at = |e: model_store::Error| {
            let api = ApiError::from(e);
            if !many {
                return api;
            }
            match api {
                ApiError::Unprocessable(m) => ApiError::Unprocessable(format!("image {i}: {m}")),
                other => other,
            }
        };
        let img = preprocess::decode(bytes, limits).map_err(at)?;
        inputs.push(preprocess::preprocess(&img, &model.manifest).map_err(at)?);
    }
    Ok(preprocess::batch(&inputs, &model.manifest, &model.device)?)
}
