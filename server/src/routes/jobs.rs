//! Training over HTTP: queue a job, follow it (JSON, Server-Sent Events, a
//! plot), cancel it. (Datasets: `datasets.rs`; evaluation: `evaluate.rs`.)

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use model_store::train;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::charts::{self, ChartParams, training::TrainingChart};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery};
use crate::jobs::JobView;
use crate::jobs::store::CancelOutcome;
use crate::openapi::{Binary, LookupErrors, Problem};
use crate::routes::output::chart_response;
use crate::state::AppState;

/// `POST /jobs` → 202.
#[derive(Debug, Serialize, ToSchema)]
pub struct Queued {
    /// The job's id.
    pub job_id: String,
    /// `queued`.
    pub status: &'static str,
}

/// `GET /jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<JobView>,
}

/// `/jobs` and what hangs off a job.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs, submit))
        .routes(routes!(get_job))
        .routes(routes!(events))
        .routes(routes!(cancel))
        .routes(routes!(job_plot))
        .routes(routes!(job_plot_png))
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("no job '{id}'; GET /jobs lists them"))
}

fn find_job(state: &AppState, id: &str) -> ApiResult<crate::jobs::store::JobRecord> {
    state.jobs.store.get(id)?.ok_or_else(|| job_not_found(id))
}

/// Queues a training run. The whole body is checked first (architecture,
/// dataset, `freeze` layers, hyper-parameters); every problem is listed in
/// one 422 and nothing is queued.
#[utoipa::path(
    post,
    path = "/jobs",
    tag = "training",
    request_body(content = Object, content_type = "application/json", description = "The job: `model_name`, `architecture` (`\"cnn_a\"`, a zoo name or `{\"layers\": [...]}`) or `init_from`, `dataset`, `epochs`, `batch_size`, `optimizer` {`type`: sgd|adam|adamw, `lr`, `momentum`, `nesterov`, `weight_decay`, `betas`, `eps`}, `augment` {`random_crop_padding`, `horizontal_flip`}, `freeze`, `seed`, `l1`, `l2`, `lr_schedule` ({`type`: step, `step_size`, `gamma`} or {`type`: cosine, `eta_min`}), `train_limit`, `test_limit`, `test_fraction`, `input`, `epoch_snapshots`, `progress_every`.",
        example = json!({"model_name": "my-cnn-a", "architecture": "cnn_a", "dataset": "mnist", "epochs": 1, "batch_size": 64, "optimizer": {"type": "adam", "lr": 0.001}, "seed": 13})),
    responses(
        (status = 202, description = "Queued; follow it at `Location`.", body = Queued, headers(("location" = String, description = "`/jobs/{id}`"))),
        (status = 400, description = "The body is not JSON.", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "An API key is configured: send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is over `--max-body-bytes`.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A model named `model_name` exists, or another queued or running job holds the name; `detail` names it.", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "The body is not `application/json`.", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The job has problems; `errors` lists each one.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn submit(
    State(state): State<AppState>,
    body: crate::extract::ApiJson<serde_json::Value>,
) -> ApiResult<Response> {
    let body = body.0;
    let spec = train::parse(&body).map_err(ApiError::Invalid)?;
    let jobs = state.jobs.clone();
    // Planning reads the datasets directory and builds the network.
    let spec_for_plan = spec.clone();
    let problems = tokio::task::spawn_blocking(move || {
        let ctx = jobs.context();
        let env = train::Env {
            models: &ctx.models,
            datasets_dir: &ctx.datasets,
            device: &ctx.device,
        };
        train::plan(&spec_for_plan, &env).err()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    // A body with problems is refused whole (a taken name among them); a
    // sound body whose name is taken or held is a conflict.
    if let Some(mut problems) = problems {
        let named = model_store::manifest::validate_model_name(&spec.model_name).is_ok();
        if named && let Err(e) = state.models.check_free(&spec.model_name) {
            problems.insert(0, format!("model_name: {e}"));
        }
        return Err(ApiError::Invalid(problems));
    }
    let id = uuid::Uuid::new_v4().to_string();
    // The name is held from here until the job ends, so no upload can take
    // it meanwhile and no second job can be queued for it.
    state
        .jobs
        .unless_stale(|| state.models.reserve(&spec.model_name, &id))?;
    if let Err(e) = state.jobs.store.insert(&id, &body) {
        state.models.release(&id);
        return Err(e.into());
    }
    state.jobs.notify();
    tracing::info!(job = %id, model = %spec.model_name, "job queued");
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("/jobs/{id}")) {
        headers.insert(header::LOCATION, v);
    }
    Ok((
        StatusCode::ACCEPTED,
        headers,
        Json(Queued {
            job_id: id,
            status: "queued",
        }),
    )
        .into_response())
}

/// Every job, newest first.
#[utoipa::path(
    get,
    path = "/jobs",
    tag = "training",
    responses(
        (status = 200, description = "The jobs.", body = JobList),
        (status = 401, description = "Reads are protected (`--protect-reads`): send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_jobs(State(state): State<AppState>) -> ApiResult<Json<JobList>> {
    let jobs = state.jobs.store.list()?;
    Ok(Json(JobList {
        jobs: jobs.iter().map(JobView::from).collect(),
    }))
}

/// One job: status, progress and the per-epoch history.
#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "training",
    params(("id" = String, Path, description = "A `job_id` from `POST /jobs`.")),
    responses((status = 200, description = "The job.", body = JobView), LookupErrors)
)]
async fn get_job(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<JobView>> {
    let job = find_job(&state, &id)?;
    Ok(Json(JobView::from(&job)))
}

fn sse(kind: &str, job: &JobView) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(job).unwrap_or_default())
}

/// Server-Sent Events: the current state at once, then a `progress` event
/// per step batch, an `epoch` event per epoch, and the final `state`.
#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    tag = "training",
    params(("id" = String, Path, description = "A `job_id` from `POST /jobs`.")),
    responses(
        (status = 200, description = "`text/event-stream`; each event's data is the job as `GET /jobs/{id}` shows it. The stream ends after the final state.", content_type = "text/event-stream", body = String),
        LookupErrors,
    )
)]
async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    // A 404 before subscribing (no channel for a job that does not exist),
    // then subscribe and read again, so nothing falls between the two.
    find_job(&state, &id)?;
    let rx = state.jobs.subscribe(&id);
    let job = find_job(&state, &id)?;
    let first = JobView::from(&job);
    let done = first.status.is_final();
    let jobs = state.jobs.clone();
    let stream = futures_util::stream::unfold(
        (Some(first), rx, done, jobs, id),
        |(first, mut rx, done, jobs, id)| async move {
            if let Some(view) = first {
                let ev = sse("state", &view);
                return Some((Ok::<_, Infallible>(ev), (None, rx, done, jobs, id)));
            }
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let last = e.kind == "state" && e.job.status.is_final();
                        return Some((Ok(sse(e.kind, &e.job)), (None, rx, last, jobs, id)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        let view = jobs
                            .store
                            .get(&id)
                            .ok()
                            .flatten()
                            .map(|j| JobView::from(&j))?;
                        return Some((Ok(sse("state", &view)), (None, rx, true, jobs, id)));
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Cancels a queued job at once, or a running one after its current batch;
/// a cancelled job registers nothing.
#[utoipa::path(
    post,
    path = "/jobs/{id}/cancel",
    tag = "training",
    params(("id" = String, Path, description = "A `job_id` from `POST /jobs`.")),
    responses(
        (status = 202, description = "Cancelled, or asked to stop; the job as it is now.", body = JobView),
        (status = 401, description = "An API key is configured: send `Authorization: Bearer <key>`.", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job.", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has already ended.", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    match state.jobs.cancel(&id)? {
        CancelOutcome::NotFound => return Err(job_not_found(&id)),
        CancelOutcome::AlreadyFinal(s) => {
            return Err(ApiError::Conflict(format!(
                "job '{id}' has already ended ({})",
                s.as_str()
            )));
        }
        CancelOutcome::Cancelled | CancelOutcome::Requested => {}
    }
    let job = find_job(&state, &id)?;
    Ok((StatusCode::ACCEPTED, Json(JobView::from(&job))).into_response())
}

/// `format` of the training plot.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PlotParams {
    /// `png` (default) or `svg` (for documents: text stays text).
    #[param(pattern = "^(png|svg)$", example = "svg")]
    pub format: Option<String>,
}

/// The training curves: loss at every progress report with the epoch
/// means, train and test accuracy per epoch, and the learning rate when a
/// schedule changes it; PNG or SVG.
#[utoipa::path(
    get,
    path = "/jobs/{id}/plot",
    tag = "training",
    params(("id" = String, Path, description = "A `job_id` from `POST /jobs`."), PlotParams, ChartParams),
    responses((status = 200, description = "The training curves.", content(
        (Binary = "image/png"), (String = "image/svg+xml"))), LookupErrors)
)]
async fn job_plot(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<PlotParams>,
    ApiQuery(chart): ApiQuery<ChartParams>,
) -> ApiResult<Response> {
    let format = match params.format.as_deref() {
        None | Some("png") => charts::Format::Png,
        Some("svg") => charts::Format::Svg,
        Some(f) => {
            return Err(ApiError::BadRequest(format!(
                "format must be png or svg, got '{f}'"
            )));
        }
    };
    plot(&state, &id, chart, format).await
}

/// The training curves as a PNG (as `GET /jobs/{id}/plot`, always PNG).
#[utoipa::path(
    get,
    path = "/jobs/{id}/plot.png",
    tag = "training",
    params(("id" = String, Path, description = "A `job_id` from `POST /jobs`."), ChartParams),
    responses((status = 200, description = "The training curves.", content_type = "image/png", body = Binary), LookupErrors)
)]
async fn job_plot_png(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(chart): ApiQuery<ChartParams>,
) -> ApiResult<Response> {
    plot(&state, &id, chart, charts::Format::Png).await
}

async fn plot(
    state: &AppState,
    id: &str,
    params: ChartParams,
    format: charts::Format,
) -> ApiResult<Response> {
    let job = find_job(state, id)?;
    // A bad size is refused before any drawing is queued.
    charts::size(&params, (charts::MIN_SIDE, charts::MIN_SIDE))?;
    let spec = train::parse(&job.spec).ok();
    let drawn = state
        .compute
        .run(move || {
            let chart = TrainingChart {
                title: format!(
                    "job {} — {}",
                    job.id,
                    spec.as_ref().map_or("?", |s| s.model_name.as_str())
                ),
                curve: &job.curve,
                history: &job.history,
                epochs: spec.as_ref().map_or(1, |s| s.epochs),
                learning_rates: spec.as_ref().and_then(|s| s.learning_rates()),
            };
            charts::render(&chart, &params, format)
        })
        .await?;
    Ok(chart_response(drawn))
}
