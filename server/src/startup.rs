//! `Application`: loads the model store, binds, serves until stopped; and
//! `Worker`, the same without the API: it runs jobs from a shared store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use model_store::{ModelStore, parse_device};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::compute::Compute;
use crate::routes;
use crate::settings::Settings;
use crate::state::AppState;

/// A server with its models loaded and its port bound.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    state: AppState,
}

impl Application {
    /// Loads every model in the models directory (a model that fails is
    /// logged, listed in `GET /models` under `load_errors`, and skipped),
    /// then binds, so that `port()` is known before serving starts.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let device = parse_device(&settings.device).map_err(StartupError::Device)?;
        let (store, pg) = open_job_store(&settings).await?;
        let storage = match (settings.models_url(), pg) {
            (None, _) => None,
            (Some(url), Some(pg)) => {
                let timeout = std::time::Duration::from_secs(settings.storage_timeout_secs);
                let st = crate::storage::SharedStorage::open(&url, pg, timeout)
                    .map_err(|e| StartupError::Storage(format!("{url}: {e}")))?;
                Some(Arc::new(st))
            }
            (Some(url), None) => return Err(StartupError::StorageWithoutCatalogue(url)),
        };
        let path = match &storage {
            Some(_) => settings.models_cache.clone(),
            None => settings.models.clone(),
        };
        let (dev, shared, seed) = (
            device.clone(),
            storage.clone(),
            settings.seed_models.clone(),
        );
        let bound = settings.models_cache_bytes;
        let models = tokio::task::spawn_blocking(move || {
            let mut models = ModelStore::open(&path, &dev)?;
            if let Some(st) = shared {
                st.seed(&seed);
                models = models.with_remote(st, bound);
                models.refresh();
            }
            Ok::<_, model_store::Error>(models)
        })
        .await
        .map_err(|e| StartupError::Loading(e.to_string()))?
        .map_err(StartupError::Models)?;
        let models = Arc::new(models);
        for m in models.list() {
            tracing::info!(model = %m.name(), architecture = %m.manifest.architecture, params = m.network.total_params(), "loaded model");
        }
        for f in models.failures() {
            tracing::warn!(file = %f.file.display(), error = %f.error, "model not loaded");
        }
        let jobs = crate::jobs::Jobs::new(
            store,
            crate::jobs::Context {
                storage,
                models: models.clone(),
                datasets: settings.datasets.clone(),
                device: device.clone(),
            },
        )?;
        jobs.start_workers(settings.train_workers, settings.train_threads());
        let compute = Compute::new(
            settings.compute_slots,
            settings.compute_queue,
            std::time::Duration::from_secs(settings.request_timeout_secs.max(1)),
        );
        let state = AppState {
            jobs,
            models,
            batcher: Arc::new(crate::batching::Batcher::new(
                compute.clone(),
                settings.predict_batch,
                std::time::Duration::from_secs_f64(settings.predict_batch_delay_ms.max(0.0) / 1e3),
                settings.compute_queue,
            )),
            compute,
            inputs: Arc::new(crate::inputs::InputCache::new(settings.inputs_cache_bytes)),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            settings: Arc::new(settings.clone()),
        };
        // Outermost last: an incoming `x-request-id` is kept (a new UUID
        // otherwise), echoed on the response, and carried by the request's
        // log span, so one id ties a client's report to the server's log.
        let router = routes::router(state.clone())
            .layer(axum::extract::DefaultBodyLimit::max(settings.max_body_bytes))
            // Inside the trace layer: its latency and log span include the
            // time spent reading a refused body.
            .layer(axum::middleware::from_fn_with_state(
                settings.drain_body_bytes,
                crate::linger::drain_unread_body,
            ))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &axum::http::Request<axum::body::Body>| {
                        let id = req
                            .headers()
                            .get("x-request-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-");
                        tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
                    })
                    .on_response(DefaultOnResponse::new().level(Level::INFO)),
            )
            // Panics outside a route (authentication, fallbacks) too.
            .layer(axum::middleware::from_fn(crate::catch_panic::catch_panic))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid));
        let listener =
            TcpListener::bind(settings.addr)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.addr,
                    source,
                })?;
        Ok(Self {
            listener,
            router,
            state,
        })
    }

    /// The server as a worker: jobs run, and only `/healthz`, `/readyz`
    /// and `/metrics` are served.
    fn into_worker(mut self) -> Self {
        self.router = routes::worker_router(self.state.clone());
        self
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The shared state (for tests and embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until Ctrl-C or SIGTERM, finishing requests in flight.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` completes, finishing requests in flight.
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let jobs = self.state.jobs.clone();
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(stop)
            .await;
        // A running job stops after its batch and resumes at the next start.
        jobs.shutdown();
        served
    }
}

/// The job store `--jobs` names (PostgreSQL, also returned for the model
/// catalogue), or SQLite at `--jobs-db`.
async fn open_job_store(
    settings: &Settings,
) -> Result<
    (
        Arc<dyn crate::jobs::store::JobStore>,
        Option<Arc<crate::jobs::postgres::PgStore>>,
    ),
    StartupError,
> {
    let Some(url) = settings.jobs.clone() else {
        let store = crate::jobs::store::SqliteStore::open(&settings.jobs_db())?;
        return Ok((Arc::new(store), None));
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StartupError::JobsUrl(url));
    }
    let opts = crate::jobs::postgres::PgOptions {
        url,
        instance: settings.instance(),
        lease: std::time::Duration::from_secs(settings.lease_secs),
        max_attempts: settings.max_attempts,
    };
    let store = tokio::task::spawn_blocking(move || crate::jobs::postgres::PgStore::open(opts))
        .await
        .map_err(|e| StartupError::Loading(e.to_string()))??;
    tracing::info!(instance = %store.instance(), "jobs in PostgreSQL");
    let store = Arc::new(store);
    Ok((store.clone(), Some(store)))
}

/// `convscope worker`: trains the jobs of a shared store and answers only
/// `/healthz`, `/readyz` and `/metrics`. SIGTERM (or Ctrl-C) lets the
/// running job finish its epoch, then gives it back to the queue.
pub struct Worker {
    app: Application,
    max_jobs: Option<usize>,
}

impl Worker {
    /// Loads the models, connects to `--jobs` (which must be PostgreSQL:
    /// with SQLite, `serve` runs its own jobs), binds and starts training.
    pub async fn build(settings: Settings, max_jobs: Option<usize>) -> Result<Self, StartupError> {
        if settings.jobs.is_none() {
            return Err(StartupError::WorkerWithoutQueue);
        }
        let mut settings = settings;
        // The workers start below, once the claim limit is set.
        let workers = std::mem::replace(&mut settings.train_workers, 0).max(1);
        let threads = settings.train_threads();
        let app = Application::build(settings).await?.into_worker();
        if let Some(n) = max_jobs {
            app.state.jobs.limit_claims(n);
        }
        app.state.jobs.start_workers(workers, threads);
        Ok(Self { app, max_jobs })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.app.local_addr()
    }

    /// Runs until a signal (then drains) or, with `--max-jobs`, until that
    /// many jobs have run.
    pub async fn run(self) -> std::io::Result<()> {
        let jobs = self.app.state.jobs.clone();
        let limited = self.max_jobs.is_some();
        let stop = async move {
            let done = async {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    if limited && jobs.workers_done() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = shutdown_signal() => {
                    // The job in hand finishes its epoch and is given back.
                    jobs.drain();
                    while !jobs.workers_done() {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                _ = done => tracing::info!("--max-jobs reached"),
            }
        };
        self.app.run_until(stop).await
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

/// Why the server could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// `--device` names no usable device.
    #[error("--device: {0}")]
    Device(model_store::Error),
    /// The models directory cannot be opened (a model that fails to load
    /// is not an error: it is skipped and listed in `load_errors`).
    #[error("--models: {0}")]
    Models(model_store::Error),
    /// Loading was interrupted (a panic in the loader).
    #[error("loading the models failed: {0}")]
    Loading(String),
    /// The job store cannot be opened or migrated.
    #[error("--jobs: {0}")]
    Jobs(#[from] crate::jobs::store::StoreError),
    /// `--jobs` is not a PostgreSQL URL.
    #[error(
        "--jobs: '{0}' is not a postgres:// URL (without --jobs, jobs are kept in SQLite at --jobs-db)"
    )]
    JobsUrl(String),
    /// Object storage cannot be opened.
    #[error("--models: {0}")]
    Storage(String),
    /// Object storage without the PostgreSQL catalogue.
    #[error("--models {0} needs --jobs postgres://...: the model catalogue lives in PostgreSQL")]
    StorageWithoutCatalogue(String),
    /// `convscope worker` without a shared queue.
    #[error(
        "convscope worker needs --jobs postgres://...: with the default SQLite queue, `convscope serve` runs its own jobs"
    )]
    WorkerWithoutQueue,
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// `--addr`.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
