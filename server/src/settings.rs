//! Server settings: every limit is explicit, has a default, and is a flag
//! with an environment variable (see `convscope serve --help`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// What `Application::build` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Directory of `<name>.json` + `<name>.safetensors` model pairs; or,
    /// with `--jobs postgres://...`, object storage shared by every replica
    /// and worker: `s3://BUCKET/PREFIX` (the `AWS_*` variables) or
    /// `file:///DIR`.
    #[arg(long, env = "CONVSCOPE_MODELS", default_value = "models")]
    pub models: PathBuf,

    /// Address to listen on.
    #[arg(long, env = "CONVSCOPE_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,

    /// Device for model weights and compute: cpu, cuda or cuda:N (cuda
    /// needs a build with `--features cuda`).
    #[arg(long, env = "CONVSCOPE_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Model used by `POST /predict`; the first model by name if unset or absent.
    #[arg(
        long,
        env = "CONVSCOPE_DEFAULT_MODEL",
        default_value = "resnet20-cifar10"
    )]
    pub default_model: String,

    /// Largest request body for inference endpoints, in bytes.
    #[arg(long, env = "CONVSCOPE_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest `POST /models` upload (manifest + weights), in bytes.
    #[arg(long, env = "CONVSCOPE_MAX_MODEL_BYTES", default_value_t = DEFAULT_MAX_MODEL_BYTES)]
    pub max_model_bytes: usize,

    /// Most bytes of a refused body (413, 401, ...) read and discarded
    /// before the answer goes out, so the client receives it instead of a
    /// connection reset (at most 10 s); 0: close at once.
    #[arg(long, env = "CONVSCOPE_DRAIN_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub drain_body_bytes: u64,

    /// Most images in one request.
    #[arg(long, env = "CONVSCOPE_MAX_BATCH", default_value_t = 64)]
    pub max_batch: usize,

    /// Largest decoded image, in pixels (checked from the header, before decoding).
    #[arg(long, env = "CONVSCOPE_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,

    /// Bytes of images kept by `POST /inputs` (least recently used go first).
    #[arg(long, env = "CONVSCOPE_INPUTS_CACHE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub inputs_cache_bytes: usize,

    /// Model computations running at once (each uses the CPU threads of
    /// candle's pool).
    #[arg(long, env = "CONVSCOPE_COMPUTE_SLOTS", default_value_t = 2)]
    pub compute_slots: usize,

    /// Computations allowed to wait for a slot; beyond that, 503 + Retry-After.
    #[arg(long, env = "CONVSCOPE_COMPUTE_QUEUE", default_value_t = 64)]
    pub compute_queue: usize,

    /// Most images one dynamically batched `/predict` pass holds
    /// (concurrent requests for the same model share a pass); 1 turns
    /// batching off.
    #[arg(long, env = "CONVSCOPE_PREDICT_BATCH", default_value_t = 32)]
    pub predict_batch: usize,

    /// Longest a `/predict` request waits for others to share its pass, in
    /// milliseconds. 0: only requests already waiting join (no added latency).
    #[arg(long, env = "CONVSCOPE_PREDICT_BATCH_DELAY_MS", default_value_t = 0.0, value_parser = parse_delay_ms)]
    pub predict_batch_delay_ms: f64,

    /// API key: when set, registering and deleting models need
    /// `Authorization: Bearer <key>` (health, readiness and metrics never do).
    #[arg(long, env = "CONVSCOPE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// With an API key, require it on read endpoints too.
    #[arg(long, env = "CONVSCOPE_PROTECT_READS", default_value_t = false)]
    pub protect_reads: bool,

    /// Longest a request may wait and compute, in seconds; beyond that, 504.
    #[arg(long, env = "CONVSCOPE_REQUEST_TIMEOUT_SECS", default_value_t = 120)]
    pub request_timeout_secs: u64,

    /// Most gradient steps one activation-maximisation request may run.
    #[arg(long, env = "CONVSCOPE_MAX_STEPS", default_value_t = 1000)]
    pub max_steps: usize,

    /// Most network passes one explanation may take, per image:
    /// integrated-gradients steps or occlusion patches, times noise-tunnel
    /// samples, summed over a faithfulness report's methods and times a
    /// sanity check's layers. Beyond it, 400 with the count.
    #[arg(
        long,
        env = "CONVSCOPE_MAX_EXPLANATION_PASSES",
        default_value_t = 20_000
    )]
    pub max_explanation_passes: usize,

    /// Directory of training and evaluation datasets (`mnist/`, `cifar10/`,
    /// `imagefolder/<name>/<class>/`).
    #[arg(long, env = "CONVSCOPE_DATASETS", default_value = "data")]
    pub datasets: PathBuf,

    /// The job queue's SQLite database (default `<models>/.jobs/jobs.sqlite3`).
    #[arg(long, env = "CONVSCOPE_JOBS_DB")]
    pub jobs_db: Option<PathBuf>,

    /// The job queue in PostgreSQL instead (`postgres://USER@HOST/DB`),
    /// shared by every API replica and `convscope worker` (they then share
    /// `--models` too); without it, SQLite at `--jobs-db`.
    #[arg(long, env = "CONVSCOPE_JOBS")]
    pub jobs: Option<String>,

    /// With `--models s3://...` (or `file://...`): this process's local
    /// cache of the models in object storage.
    #[arg(long, env = "CONVSCOPE_MODELS_CACHE", default_value = "models-cache")]
    pub models_cache: PathBuf,

    /// With `--models s3://...`: bytes of weights kept loaded and cached
    /// here at most; models load on first use and the least recently used
    /// go beyond it (0: no bound).
    #[arg(long, env = "CONVSCOPE_MODELS_CACHE_BYTES", default_value_t = 4 * 1024 * 1024 * 1024)]
    pub models_cache_bytes: u64,

    /// With `--models s3://...`: the models an empty catalogue is seeded
    /// with, once (the bundled ones).
    #[arg(long, env = "CONVSCOPE_SEED_MODELS", default_value = "models")]
    pub seed_models: PathBuf,

    /// Seconds one object-storage request may take before the change it
    /// belongs to is refused with 503 (nothing is half-written).
    #[arg(long = "storage-timeout", env = "CONVSCOPE_STORAGE_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub storage_timeout_secs: u64,

    /// Seconds a claimed job stays this worker's without a heartbeat (sent
    /// every second) before another worker may take it over (`--jobs`
    /// PostgreSQL only).
    #[arg(long = "lease", env = "CONVSCOPE_LEASE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    pub lease_secs: u64,

    /// Starts after which a job whose worker keeps dying fails instead of
    /// being claimed again (`--jobs` PostgreSQL only).
    #[arg(long, env = "CONVSCOPE_MAX_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// This process's name in a shared job store: the `worker` a job shows
    /// while it runs here (default: host name, process id and a random
    /// suffix).
    #[arg(long, env = "CONVSCOPE_INSTANCE")]
    pub instance: Option<String>,

    /// Training jobs run at once (0: queue jobs but run none here).
    #[arg(long, env = "CONVSCOPE_TRAIN_WORKERS", default_value_t = 1)]
    pub train_workers: usize,

    /// CPU threads each training job uses (default: half the cores, at
    /// least 1), so inference keeps the rest.
    #[arg(long, env = "CONVSCOPE_TRAIN_THREADS")]
    pub train_threads: Option<usize>,
}

/// A batching delay: finite, 0 to 1000 ms.
fn parse_delay_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1000.0).contains(&v) => Ok(v),
        _ => Err(format!("expected milliseconds from 0 to 1000, got '{s}'")),
    }
}

/// Largest `POST /models` upload by default: 1 GiB (VGG-19 is 548 MB).
pub const DEFAULT_MAX_MODEL_BYTES: usize = 1024 * 1024 * 1024;

impl Settings {
    /// When a request arriving now must be answered: the long inspections
    /// stop between their batches once it has passed (`--request-timeout-secs`).
    pub fn deadline(&self) -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// The jobs database path.
    pub fn jobs_db(&self) -> PathBuf {
        self.jobs_db
            .clone()
            .unwrap_or_else(|| self.models.join(".jobs").join("jobs.sqlite3"))
    }

    /// `--models` when it is an object-storage URL (`s3://`, `file://`).
    pub fn models_url(&self) -> Option<String> {
        let s = self.models.to_str()?;
        (s.starts_with("s3://") || s.starts_with("file://")).then(|| s.to_string())
    }

    /// This process's name in a shared job store.
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "convscope".into());
            let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
            format!("{host}-{}-{suffix}", std::process::id())
        })
    }

    /// Threads per training job.
    pub fn train_threads(&self) -> usize {
        self.train_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        })
    }

    /// Defaults for tests and embedding: the given models directory on
    /// 127.0.0.1 with an OS-chosen port.
    pub fn for_tests(models: impl Into<PathBuf>) -> Self {
        Self {
            models: models.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            device: "cpu".into(),
            default_model: "resnet20-cifar10".into(),
            max_body_bytes: 32 * 1024 * 1024,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
            drain_body_bytes: 64 * 1024 * 1024,
            max_batch: 64,
            max_pixels: 40_000_000,
            inputs_cache_bytes: 256 * 1024 * 1024,
            compute_slots: 2,
            compute_queue: 64,
            predict_batch: 32,
            predict_batch_delay_ms: 0.0,
            api_key: None,
            protect_reads: false,
            request_timeout_secs: 120,
            max_steps: 1000,
            max_explanation_passes: 20_000,
            datasets: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data")),
            jobs_db: None,
            jobs: None,
            models_cache: PathBuf::from("models-cache"),
            models_cache_bytes: 4 * 1024 * 1024 * 1024,
            seed_models: PathBuf::from("models"),
            storage_timeout_secs: 10,
            lease_secs: 30,
            max_attempts: 3,
            instance: None,
            train_workers: 1,
            train_threads: None,
        }
    }
}
