//! Optional API key. Off by default, as students running the service
//! locally expect. With `--api-key`, the endpoints that change the server
//! (register and delete models, queue and cancel training jobs) need
//! `Authorization: Bearer <key>`; with
//! `--protect-reads` every other endpoint does too. Health, readiness and
//! metrics never do, so probes and scrapers keep working.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

fn always_open(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v2/health/live" | "/v2/health/ready"
    )
}

fn mutating(method: &Method, path: &str) -> bool {
    (method == Method::POST && (path == "/models" || path == "/jobs"))
        || (method == Method::POST && path.starts_with("/jobs/") && path.ends_with("/cancel"))
        || (method == Method::DELETE && path.starts_with("/models/"))
}

/// Equal lengths and equal bytes, in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token where one is needed.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.settings.api_key.as_deref().filter(|k| !k.is_empty()) else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let needed =
        !always_open(path) && (mutating(req.method(), path) || state.settings.protect_reads);
    if needed {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            // The body a client is still uploading is read by
            // `linger::drain_unread_body` before this 401 goes out.
            let mut response = ApiError::Unauthorized(
                "this endpoint needs the server's API key: send `Authorization: Bearer <key>`"
                    .into(),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(req).await
}
