//! Liveness and readiness.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::state::AppState;

/// `GET /healthz`, `GET /readyz`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Liveness: the process answers.
async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the model store is loaded (the server binds only after it
/// is, so once this answers it is 200) and how many models it holds.
async fn readyz(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ready", "models": state.registry.names().len()}))
}
