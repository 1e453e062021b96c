//! One module per resource, each with its own `router()`. Every handler is
//! annotated for OpenAPI and routed with `routes!`, so `api_router` yields
//! the router and the document together.

pub mod activations;
pub mod datasets;
pub mod embeddings;
pub mod evaluate;
pub mod faithfulness;
pub mod filters;
pub mod gradcam;
pub mod health;
pub mod inputs;
pub mod jobs;
pub mod maximize;
pub mod models;
pub mod output;
pub mod pages;
pub mod predict;
pub mod saliency;
pub mod sanity;
pub mod v2;

use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::openapi::ApiDoc;
use crate::state::AppState;

/// Every documented route, before state and middleware. `max_model_bytes`
/// bounds `POST /models` uploads (it does not change the document).
pub fn api_router_with(max_model_bytes: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(crate::metrics::metrics))
        .routes(routes!(crate::openapi::openapi_json))
        .merge(pages::router())
        .merge(health::router())
        .merge(models::router(max_model_bytes))
        .merge(predict::router())
        .merge(activations::router())
        .merge(filters::router())
        .merge(gradcam::router())
        .merge(saliency::router())
        .merge(faithfulness::router())
        .merge(sanity::router())
        .merge(maximize::router())
        .merge(embeddings::router())
        .merge(inputs::router())
        .merge(jobs::router())
        .merge(datasets::router())
        .merge(evaluate::router())
        .merge(v2::router())
}

/// The documented routes with the default upload limit (for the document).
pub fn api_router() -> OpenApiRouter<AppState> {
    api_router_with(crate::settings::DEFAULT_MAX_MODEL_BYTES)
}

/// What `convscope worker` serves: liveness, readiness and metrics.
pub fn worker_router(state: AppState) -> Router {
    let (routes, _) = OpenApiRouter::new()
        .routes(routes!(crate::metrics::metrics))
        .merge(health::router())
        .split_for_parts();
    routes
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(format!(
                "a worker serves only /healthz, /readyz and /metrics, not {}",
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

/// Every route of the API, with fallbacks, auth and metrics.
pub fn router(state: AppState) -> Router {
    let (routes, _) = api_router_with(state.settings.max_model_bytes).split_for_parts();
    let routes = routes
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::MethodNotAllowed(format!(
                    "{} does not accept {method}; see /docs for the endpoints",
                    uri.path()
                ))
            },
        )
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::NotFound(format!(
                "no route for {}; see /docs for the endpoints",
                uri.path()
            ))
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_key,
        ));
    #[cfg(feature = "test-hooks")]
    let routes = routes.route_layer(axum::middleware::from_fn(crate::catch_panic::hook::inject));
    // Inside the metrics layer, so a request that panicked is counted as
    // the 500 it was answered with.
    routes
        .route_layer(axum::middleware::from_fn(crate::catch_panic::catch_panic))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        // Last, so it wraps every route and layer above and the fallbacks:
        // each error under /v2, wherever it was made, in the inference
        // protocol's shape.
        .layer(axum::middleware::from_fn(crate::oip::protocol_errors))
        .with_state(state)
}
