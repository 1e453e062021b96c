//! Pages for people: the inspector at `/`, Swagger UI at `/docs`, and the
//! exporter at `/export.py` (so a student can `curl -O host:8080/export.py`
//! next to their notebook).
//!
//! Both are static files compiled into the binary (`server/assets/`), so
//! they work offline and need no build step; Swagger UI is vendored from
//! `swagger-ui-dist` (see `server/assets/README.md`).

use axum::http::header;
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

const INSPECTOR_HTML: &str = include_str!("../../assets/inspector.html");
const DOCS_HTML: &str = include_str!("../../assets/docs.html");
const SWAGGER_JS: &str = include_str!("../../assets/swagger-ui/swagger-ui-bundle.js");
const SWAGGER_CSS: &str = include_str!("../../assets/swagger-ui/swagger-ui.css");
/// The very file in the repository, compiled in: what is served is what is tested.
const EXPORT_PY: &str = include_str!("../../../tools/export/convscope_export.py");

/// A day: the assets change only with the binary.
const CACHE: &str = "public, max-age=86400";

/// `/`, `/docs` and Swagger UI's two assets.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(inspector))
        .routes(routes!(docs))
        .routes(routes!(swagger_js))
        .routes(routes!(swagger_css))
        .routes(routes!(export_py))
}

/// The exporter: a torch.fx-traceable `nn.Module` → a `graph` manifest and
/// its safetensors, which `POST /models` takes as they are.
#[utoipa::path(get, path = "/export.py", tag = "models",
    responses((status = 200, description = "tools/export/convscope_export.py (needs Python with torch; run it with --help).", content_type = "text/x-python", body = String)))]
async fn export_py() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/x-python; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"convscope_export.py\"",
            ),
        ],
        EXPORT_PY,
    )
}

/// The inspector: pick a model, drop an image, see its predictions,
/// activations, filters, Grad-CAM and embedding distances.
#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "The inspector page.", content_type = "text/html", body = String)))]
async fn inspector() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INSPECTOR_HTML,
    )
}

/// Swagger UI on `/openapi.json`.
#[utoipa::path(get, path = "/docs", tag = "service",
    responses((status = 200, description = "Swagger UI for this API.", content_type = "text/html", body = String)))]
async fn docs() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DOCS_HTML,
    )
}

/// Swagger UI's script.
#[utoipa::path(get, path = "/docs/swagger-ui-bundle.js", tag = "service",
    responses((status = 200, description = "Swagger UI's script (vendored).", content_type = "text/javascript", body = String)))]
async fn swagger_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, CACHE),
        ],
        SWAGGER_JS,
    )
}

/// Swagger UI's style sheet.
#[utoipa::path(get, path = "/docs/swagger-ui.css", tag = "service",
    responses((status = 200, description = "Swagger UI's style sheet (vendored).", content_type = "text/css", body = String)))]
async fn swagger_css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, CACHE),
        ],
        SWAGGER_CSS,
    )
}
