//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Models loaded.
    pub models: usize,
}

/// `GET /healthz`, `GET /readyz`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// Liveness: the process answers (never needs an API key).
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "The process is up.", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the model store is loaded (the server binds only after it
/// is, so once this answers it is 200) and how many models it holds.
#[utoipa::path(get, path = "/readyz", tag = "service", responses((status = 200, description = "The model store is loaded.", body = Ready)))]
async fn readyz(State(state): State<AppState>) -> Json<Ready> {
    Json(Ready {
        status: "ready",
        models: state.models.names().len(),
    })
}
