//! One module per resource, each with its own `router()`.

pub mod activations;
pub mod embeddings;
pub mod filters;
pub mod gradcam;
pub mod health;
pub mod inputs;
pub mod maximize;
pub mod models;
pub mod predict;
pub mod saliency;

use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

/// Every route of the API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(crate::metrics::metrics))
        .merge(health::router())
        .merge(models::router(&state.settings))
        .merge(predict::router())
        .merge(activations::router())
        .merge(filters::router())
        .merge(gradcam::router())
        .merge(saliency::router())
        .merge(maximize::router())
        .merge(embeddings::router())
        .merge(inputs::router())
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::MethodNotAllowed(format!(
                    "{} does not accept {method}; see the README for the endpoints",
                    uri.path()
                ))
            },
        )
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(format!(
                "no route for {}; see the README for the endpoints",
                uri.path()
            ))
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_key,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}
