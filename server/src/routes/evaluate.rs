//! A model's accuracy, per-class scores and confusion matrix, on a
//! dataset's test split or on uploaded labelled images.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use model_store::train::{self, Evaluation};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::charts::{self, ChartParams, confusion::ConfusionChart};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::input::ImageUpload;
use crate::openapi::{Binary, ImageErrors, LabelledImageForm};
use crate::pipeline::Pipeline;
use crate::routes::output::chart_response;
use crate::state::AppState;

/// `POST /models/{model}/evaluate`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluationView {
    /// The model.
    pub model: String,
    /// The dataset, or `upload`.
    pub dataset: String,
    /// Accuracy, confusion matrix (`M[true][predicted]`), per-class scores.
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

/// The JSON body of `POST /models/{model}/evaluate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateBody {
    /// A name from `GET /datasets`; its test split is used.
    pub dataset: String,
    /// Only the first N test images.
    #[schema(minimum = 1)]
    pub limit: Option<usize>,
}

/// Query of the evaluate endpoint.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EvaluateParams {
    /// `json` (default), or the confusion matrix as a chart: `png` or `svg`.
    #[param(pattern = "^(json|png|svg)$", example = "json")]
    pub format: Option<String>,
}

/// `/models/{model}/evaluate`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(evaluate))
}

/// Accuracy, per-class precision and recall, and the confusion matrix: on a
/// dataset's test split (JSON body), or on uploaded images with labels
/// (multipart `image` and `label` fields in order).
#[utoipa::path(
    post,
    path = "/models/{model}/evaluate",
    tag = "training",
    params(("model" = String, Path, description = "A name from `GET /models`.", example = "cnn-a-mnist"), EvaluateParams, ChartParams),
    request_body(content(
        (EvaluateBody = "application/json", example = json!({"dataset": "mnist", "limit": 1000})),
        (LabelledImageForm = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "The scores, or with `format=png` or `svg` the confusion matrix as a chart: class names on both axes, counts in the cells, colour by the share of the true class with a colour bar.", content(
            (EvaluationView = "application/json"), (Binary = "image/png"), (String = "image/svg+xml"))),
        ImageErrors,
    )
)]
async fn evaluate(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    ApiQuery(params): ApiQuery<EvaluateParams>,
    ApiQuery(chart_params): ApiQuery<ChartParams>,
    req: Request,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&state, &model)?;
    let model = pipeline.model.clone();
    let chart_format = match params.format.as_deref() {
        None | Some("json") => None,
        Some("png") => Some(charts::Format::Png),
        Some("svg") => Some(charts::Format::Svg),
        Some(f) => {
            return Err(ApiError::BadRequest(format!(
                "format must be json, png or svg, got '{f}'"
            )));
        }
    };
    if chart_format.is_some() {
        // A bad size is refused before anything is evaluated.
        charts::size(&chart_params, (charts::MIN_SIDE, charts::MIN_SIDE))?;
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (dataset, evaluation) = if is_json {
        let crate::extract::ApiJson(body) =
            crate::extract::ApiJson::<EvaluateBody>::from_request(req, &state).await?;
        if body.limit == Some(0) {
            return Err(ApiError::Unprocessable("limit must be at least 1".into()));
        }
        let dir = state.jobs.context().datasets.clone();
        let name = body.dataset.clone();
        let e = pipeline
            .compute(move |m, _| Ok(train::evaluate(m, &dir, &name, body.limit)?))
            .await?;
        (body.dataset, e)
    } else {
        let upload = ImageUpload::from_request(req, &state).await?;
        if upload.labels.len() != upload.images.len() {
            return Err(ApiError::BadRequest(format!(
                "send one `label` field per `image` field (got {} images, {} labels)",
                upload.images.len(),
                upload.labels.len()
            )));
        }
        let labels = upload
            .labels
            .iter()
            .map(|l| Ok(model.class_index(l)? as u32))
            .collect::<ApiResult<Vec<u32>>>()?;
        let e = pipeline
            .on_images(upload.images, move |m, x, _| {
                Ok(train::evaluate_batch(m, &x, &labels)?)
            })
            .await?;
        ("upload".to_string(), e)
    };
    if let Some(format) = chart_format {
        let title = format!("{} on {dataset}", model.name());
        let drawn = pipeline
            .compute(move |_, _| {
                let chart = ConfusionChart {
                    evaluation: &evaluation,
                    title,
                };
                charts::render(&chart, &chart_params, format)
            })
            .await?;
        return Ok(chart_response(drawn));
    }
    Ok(Json(EvaluationView {
        model: model.name().to_string(),
        dataset,
        evaluation,
    })
    .into_response())
}
