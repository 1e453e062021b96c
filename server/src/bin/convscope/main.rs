//! The `convscope` binary: `serve` is the library's `Application`; the
//! binary-only commands `bench` and `train` live beside this file.

mod bench;
mod train;

use clap::{Parser, Subcommand};
use convscope::{Application, Settings, Worker};

#[derive(Parser)]
#[command(
    name = "convscope",
    version,
    about = "Opens up trained convolutional networks over HTTP."
)]
struct Cli {
    /// Log lines as human-readable text or as JSON objects (one per line).
    #[arg(long, global = true, env = "CONVSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models directory over HTTP.
    Serve(Box<Settings>),
    /// Run training jobs from a shared queue (`--jobs postgres://...`, the
    /// same `--models` as the API replicas), serving only /healthz, /readyz
    /// and /metrics on --addr. SIGTERM: the running job finishes its epoch
    /// and goes back to the queue.
    Worker(Box<WorkerArgs>),
    /// Print the OpenAPI 3.1 document (`convscope openapi > openapi/openapi.json`).
    Openapi,
    /// Run a training job in the foreground (the body `POST /jobs` takes),
    /// with a progress bar; the model is written into the models directory.
    /// Interrupted, it resumes from its last epoch when run again.
    Train(TrainArgs),
    /// Time the model-level cases of BENCHMARKS.md (forward passes,
    /// Grad-CAM, the activation sheet, a training step); pin the threads
    /// with RAYON_NUM_THREADS. tools/bench/forward.py times them in PyTorch.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[command(flatten)]
    settings: Settings,
    /// Stop after running this many jobs (one-shot workers).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_jobs: Option<u64>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Models directory (the bundled ResNet-20, MobileNet, CNN_A).
    #[arg(long, env = "CONVSCOPE_MODELS", default_value = "models")]
    models: std::path::PathBuf,
    /// Timed iterations per case (after 3 warm-up ones).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Only the cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time a batch-1 forward of every `graph` model in this
    /// directory (`tools/bench/graph_models.py` exports torchvision's there
    /// and times PyTorch on the same weights).
    #[arg(long)]
    graph: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The job, as JSON.
    job: std::path::PathBuf,
    /// Models directory (sources for `init_from`; where the result goes).
    #[arg(long, env = "CONVSCOPE_MODELS", default_value = "models")]
    models: std::path::PathBuf,
    /// Datasets directory.
    #[arg(long, env = "CONVSCOPE_DATASETS", default_value = "data")]
    datasets: std::path::PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CONVSCOPE_DEVICE", default_value = "cpu")]
    device: String,
}

/// Process-wide settings the compute needs before any thread exists.
///
/// - glibc keeps 64 MiB of freed memory in its heap instead of giving it
///   back at once. Every tensor is a fresh allocation; without the pad, a
///   training step's buffers are unmapped when freed and faulted in again,
///   page by page, on the next step (CNN_A step: 24 ms -> 16 ms).
/// - Blocks up to 32 MiB (glibc's largest threshold) come from the heap
///   instead of their own `mmap`, and the heap gives back its top only
///   beyond 1 GiB free. Otherwise every activation and gradient buffer
///   above glibc's running threshold is mapped, zero-faulted page by page
///   and unmapped again, each unmap a TLB shootdown on every core: a third
///   of a backward pass's time went to the kernel. ResNet-18 224² forward
///   at batch 8: 31.3 -> 21.7 ms per image; integrated gradients (50
///   steps): 9.8 -> 4.6 s. The price: the process keeps the memory of its
///   largest request until it exceeds 1 GiB free.
/// - candle's elementwise ops run on a pool of its own whose worker spins
///   25,000 times after each op waiting for the next; on a machine with
///   few cores that spinning takes a core from the rayon workers of the
///   next convolution. 2,000 spins keeps back-to-back candle ops fast and
///   gives the core back soon (CNN_A step: 15.6 -> 12.8 ms on 2 cores). An
///   explicit `CANDLE_BARRIER_POOL_SPIN_LIMIT` is kept.
#[allow(unsafe_code)]
fn tune_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in `main`, before any other thread
        // exists that could read the environment concurrently.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000") };
    }
}

fn main() {
    tune_process();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts")
        .block_on(run());
}

async fn run() {
    let Cli {
        log_format,
        command,
    } = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // A typo in the kernel cap stops every command here instead of being
    // ignored.
    let tier = match model_store::kernels::tier::check_env() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("convscope: {e}");
            std::process::exit(2);
        }
    };
    match command {
        Command::Openapi => print!("{}", convscope::openapi::document_json()),
        Command::Bench(args) => {
            let threads = candle_core::utils::get_num_threads();
            let timings = bench::run(&args.models, args.runs.max(1), args.only.as_deref())
                .and_then(|mut t| {
                    if let Some(dir) = &args.graph {
                        t.extend(bench::graph_models(dir, args.runs.max(1))?);
                    }
                    Ok(t)
                });
            // Measured after the cases, on a machine they left idle.
            let peak = model_store::kernels::peak::gflops(tier, threads);
            let gemm = model_store::kernels::tier::gemm_isa();
            let percent = |g: Option<f64>| g.zip(peak).map(|(g, p)| 100.0 * g / p);
            match timings {
                Ok(timings) if args.json => {
                    let cases: Vec<_> = timings
                        .iter()
                        .map(|t| {
                            let mut v = serde_json::to_value(t).unwrap_or_default();
                            v["gflops"] = serde_json::json!(t.gflops());
                            v["peak_percent"] = serde_json::json!(percent(t.gflops()));
                            v
                        })
                        .collect();
                    let out = serde_json::json!({"threads": threads, "kernels": tier.name(), "gemm": gemm, "peak_gflops": peak, "runs": args.runs, "cases": cases});
                    println!("{out:#}");
                }
                Ok(timings) => {
                    let peak_line = match peak {
                        Some(p) => format!("{p:.0} GFLOP/s on {threads} threads"),
                        None => "not measured at this tier".to_string(),
                    };
                    println!(
                        "convscope {}, candle threads: {threads}, kernel tier: {tier} (gemm: {gemm}), peak at that tier: {peak_line}, median of {} runs after 3 warm-up",
                        env!("CARGO_PKG_VERSION"),
                        args.runs
                    );
                    println!(
                        "{:<42} {:>10} {:>10} {:>12} {:>9} {:>7}",
                        "case", "median ms", "p90 ms", "ms / image", "GFLOP/s", "% peak"
                    );
                    let or_dash = |v: Option<f64>, w: usize| match v {
                        Some(v) => format!("{v:>w$.0}"),
                        None => format!("{:>w$}", "-"),
                    };
                    for t in timings {
                        println!(
                            "{:<42} {:>10.2} {:>10.2} {:>12.2} {} {}",
                            t.case,
                            t.median_ms,
                            t.p90_ms,
                            t.median_ms / t.batch as f64,
                            or_dash(t.gflops(), 9),
                            or_dash(percent(t.gflops()), 7),
                        );
                    }
                }
                Err(e) => {
                    eprintln!("convscope bench: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Train(args) => {
            // On a rayon worker, as the server's jobs train: the kernels'
            // parallel loops then start warm.
            let result = rayon::scope(|_| {
                train::train(&args.job, &args.models, &args.datasets, &args.device)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = result {
                eprintln!("convscope train: {e}");
                std::process::exit(1);
            }
        }
        Command::Worker(args) => {
            let WorkerArgs { settings, max_jobs } = *args;
            let worker = match Worker::build(settings, max_jobs.map(|n| n as usize)).await {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("convscope worker: {e}");
                    std::process::exit(1);
                }
            };
            tracing::info!(addr = %worker.local_addr(), kernels = %tier, "worker running jobs");
            if let Err(e) = worker.run().await {
                eprintln!("convscope worker: {e}");
                std::process::exit(1);
            }
        }
        Command::Serve(settings) => {
            let app = match Application::build(*settings).await {
                Ok(app) => app,
                Err(e) => {
                    eprintln!("convscope: {e}");
                    std::process::exit(1);
                }
            };
            tracing::info!(addr = %app.local_addr(), models = app.state().models.names().len(), kernels = %tier, "serving");
            if let Err(e) = app.run_until_stopped().await {
                eprintln!("convscope: {e}");
                std::process::exit(1);
            }
        }
    }
}
