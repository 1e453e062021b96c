//! One error type for every endpoint, written as RFC 9457 problem+json.
//!
//! Each variant's doc names its status. Client mistakes carry a detail that
//! says what to fix; server faults are logged with their cause and answered
//! generically, so internals never leak into a response.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered as `application/problem+json`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 404: an unknown model, layer or route.
    #[error("{0}")]
    NotFound(String),
    /// 400: a parameter is malformed or out of range.
    #[error("{0}")]
    BadRequest(String),
    /// 415: the body's content type is not one this endpoint reads.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: the body is well-formed but its content is unusable (an image
    /// that does not decode, a manifest that does not match its weights).
    #[error("{0}")]
    Unprocessable(String),
    /// 422 with every problem listed (`errors`): a job body, checked whole.
    #[error("{} problem(s): {}", .0.len(), .0.join("; "))]
    Invalid(Vec<String>),
    /// 409: the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body, batch or image is over a documented limit.
    #[error("{0}")]
    TooLarge(String),
    /// 401: the endpoint needs the API key.
    #[error("{0}")]
    Unauthorized(String),
    /// 503: the compute queue is full; retry after a moment.
    #[error("{0}")]
    Busy(String),
    /// 504: the computation took longer than the request timeout.
    #[error("{0}")]
    Timeout(String),
    /// 405: the path exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 500: our fault; the detail is logged, not sent.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) | ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            ApiError::NotFound(_) => "not-found",
            ApiError::BadRequest(_) => "bad-request",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::Unprocessable(_) | ApiError::Invalid(_) => "unprocessable",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too-large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Busy(_) => "busy",
            ApiError::Timeout(_) => "timeout",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<model_store::Error> for ApiError {
    fn from(e: model_store::Error) -> Self {
        use model_store::Error as E;
        match e {
            E::Manifest(_)
            | E::UnknownArchitecture { .. }
            | E::Checkpoint { .. }
            | E::Check(_)
            | E::Shape { .. } => ApiError::Unprocessable(e.to_string()),
            E::ImageDecode(_) | E::ImageInput(_) | E::Dataset(_) => {
                ApiError::Unprocessable(e.to_string())
            }
            E::UnknownLayer { .. } | E::UnknownModel { .. } => ApiError::NotFound(e.to_string()),
            E::NameTaken { .. } | E::NameHeld { .. } => ApiError::Conflict(e.to_string()),
            // S3 or PostgreSQL away: 503 with Retry-After.
            E::Unavailable(_) => ApiError::Busy(e.to_string()),
            E::InvalidArgument { .. } => ApiError::BadRequest(e.to_string()),
            E::DeadlineExceeded(_) => {
                ApiError::Timeout(format!("{e} (--request-timeout-secs); try fewer steps"))
            }
            E::Io { .. }
            | E::Forward { .. }
            | E::Candle(_)
            | E::NotReserved { .. }
            | E::DirectoryInUse { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::jobs::store::StoreError> for ApiError {
    fn from(e: crate::jobs::store::StoreError) -> Self {
        use crate::jobs::store::StoreError as E;
        match e {
            // PostgreSQL restarting or unreachable: the request may be
            // repeated in a moment (503 with Retry-After).
            E::Unavailable(_) => ApiError::Busy(e.to_string()),
            E::Conflict(msg) => ApiError::Conflict(msg),
            E::Sqlite(_) | E::Postgres(_) | E::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                "the server failed to handle this request; the cause is in its log".to_string()
            }
            other => other.to_string(),
        };
        let mut body = json!({
            "type": format!("urn:convscope:problem:{}", self.slug()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        if let ApiError::Invalid(problems) = &self {
            body["errors"] = json!(problems);
        }
        let mut response = (status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // An error may be answered before the request body was read (too
        // large, not multipart, unknown route); hyper then drops the
        // connection, and a client reusing it would see a reset instead of
        // this answer. Saying so lets every client open a fresh one.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        if matches!(self, ApiError::Busy(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;
