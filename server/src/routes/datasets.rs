//! The datasets the server can train and evaluate on.

use axum::Json;
use axum::extract::State;
use model_store::train;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::openapi::Problem;
use crate::state::AppState;

/// A dataset (`model_store::train::data::DatasetInfo`).
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetView {
    /// Name in job bodies.
    pub name: String,
    /// `mnist`, `cifar10` or `imagefolder`.
    pub format: String,
    /// `[C, H, W]`, when fixed.
    pub shape: Option<[usize; 3]>,
    /// Class names.
    pub classes: Vec<String>,
    /// Training images (ImageFolder: all, before the split).
    pub train_size: usize,
    /// Test images.
    pub test_size: usize,
}

/// `GET /datasets`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DatasetList {
    /// What jobs can train and evaluate on.
    pub datasets: Vec<DatasetView>,
}

/// `/datasets`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(datasets))
}

/// The datasets jobs can train and evaluate on (`--datasets`).
#[utoipa::path(
    get,
    path = "/datasets",
    tag = "training",
    responses(
        (status = 200, description = "The datasets.", body = DatasetList),
        (status = 401, description = "Reads are protected (`--protect-reads`): send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn datasets(State(state): State<AppState>) -> Json<DatasetList> {
    let list = train::data::list(&state.jobs.context().datasets);
    Json(DatasetList {
        datasets: list
            .into_iter()
            .map(|d| DatasetView {
                name: d.name,
                format: d.format.to_string(),
                shape: d.shape,
                classes: d.classes,
                train_size: d.train_size,
                test_size: d.test_size,
            })
            .collect(),
    })
}
