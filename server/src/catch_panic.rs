//! No panic escapes a request: whatever panics while a request is handled
//! (an extractor, a handler, a renderer, a middleware inside this one)
//! becomes a logged 500 problem+json that carries the request id, and the
//! connection and the server go on serving. Every other 500 (a panic on the
//! compute pool, a failed store) gets the request id in its body too, so a
//! client's report leads straight to the log line with the cause.
//!
//! tower-http's `CatchPanicLayer` does the same but hands its callback only
//! the panic payload, not the request, so the id could not go in the body.

use std::panic::AssertUnwindSafe;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use serde_json::json;

/// The middleware: runs the rest of the stack, catching a panic's unwind.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let route = req.uri().path().to_string();
    // A handler's state is cheap handles whose locks ignore poisoning, so
    // nothing it leaves half-done is observed after the unwind.
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(response) if response.status() == StatusCode::INTERNAL_SERVER_ERROR => {
            with_request_id(response, &id).await
        }
        Ok(response) => response,
        Err(panic) => {
            let what = panic_message(panic.as_ref());
            tracing::error!(request_id = %id, %route, panic = %what, "request handler panicked");
            problem(&id)
        }
    }
}

/// A 500 problem+json with `request_id` added to its body (its detail is
/// already generic: the cause is in the log).
async fn with_request_id(response: Response, request_id: &str) -> Response {
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Problem bodies are a few hundred bytes; anything larger is not one.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return problem(request_id);
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(mut v) if v.is_object() => {
            v["request_id"] = json!(request_id);
            Response::from_parts(parts, axum::body::Body::from(v.to_string()))
        }
        _ => Response::from_parts(parts, axum::body::Body::from(bytes)),
    }
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a
/// `String`), for the log; shared by the request, compute-pool and
/// training-worker catches.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into())
}

fn problem(request_id: &str) -> Response {
    let status = StatusCode::INTERNAL_SERVER_ERROR;
    let body = json!({
        "type": "urn:convscope:problem:internal",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": format!("the server failed to handle this request; its log has the cause under request id {request_id}"),
        "request_id": request_id,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// A panic on demand, for the tests: compiled only with the `test-hooks`
/// feature, and armed only from inside the process, never over HTTP.
#[cfg(feature = "test-hooks")]
pub mod hook {
    use std::sync::RwLock;

    static PANIC_ON: RwLock<Option<String>> = RwLock::new(None);

    /// Every later request whose path is `path` panics inside the router
    /// (`None` disarms).
    pub fn panic_on(path: Option<&str>) {
        *PANIC_ON.write().unwrap_or_else(|e| e.into_inner()) = path.map(str::to_string);
    }

    /// The middleware that panics when armed for this path.
    pub async fn inject(
        req: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        let armed = PANIC_ON
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .is_some_and(|p| p == req.uri().path());
        if armed {
            panic!("injected by the test hook for {}", req.uri().path());
        }
        next.run(req).await
    }
}
