//! Extractors whose rejections are [`ApiError`]s, so a malformed query, path
//! or body gets the same problem+json shape as every other error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `axum::extract::Query` answering 400 problem+json.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))
    }
}

/// `axum::extract::Path` answering 400 problem+json.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::BadRequest(format!("invalid path: {}", e.body_text())))
    }
}

/// `axum::Json` answering 400/415/422 problem+json.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection as R;
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|j| ApiJson(j.0))
            .map_err(|e| match e {
                R::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                    "send the body as JSON with Content-Type: application/json".into(),
                ),
                R::JsonDataError(e) => ApiError::Unprocessable(e.body_text()),
                R::JsonSyntaxError(e) => ApiError::BadRequest(e.body_text()),
                other => body_error(other.status(), other.body_text()),
            })
    }
}

/// Refuses a body whose declared `Content-Length` is over `limit` before
/// any of it is buffered, and before a client waiting for `100 Continue`
/// sends it. (What a client sends anyway is read and discarded by
/// `linger`, bounded, so that it receives this 413.)
pub fn declared_within(headers: &HeaderMap, limit: usize, flag: &str) -> Result<(), ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(ApiError::TooLarge(format!(
            "the request body is {n} bytes, over this server's limit of {limit} bytes; see {flag}"
        ))),
        _ => Ok(()),
    }
}

/// Maps a body-reading failure: over the size limit → 413, else 400.
pub fn body_error(status: axum::http::StatusCode, text: String) -> ApiError {
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "the request body is over this server's limit ({text}); see --max-body-bytes"
        ))
    } else {
        ApiError::BadRequest(format!("cannot read the request body: {text}"))
    }
}
