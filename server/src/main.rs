//! The `convscope` binary: thin on purpose; everything lives in the library.

use clap::{Parser, Subcommand};
use convscope::{Application, Settings};

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
    Serve(Settings),
    /// Print the OpenAPI 3.1 document (`convscope openapi > openapi/openapi.json`).
    Openapi,
    /// Run a training job in the foreground (the body `POST /jobs` takes),
    /// with a progress bar; the model is written into the models directory.
    /// Interrupted, it resumes from its last epoch when run again.
    Train(TrainArgs),
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

#[tokio::main]
async fn main() {
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
    match command {
        Command::Openapi => print!("{}", convscope::openapi::document_json()),
        Command::Train(args) => {
            if let Err(e) =
                convscope::cli::train(&args.job, &args.models, &args.datasets, &args.device)
            {
                eprintln!("convscope train: {e}");
                std::process::exit(1);
            }
        }
        Command::Serve(settings) => {
            let app = match Application::build(settings).await {
                Ok(app) => app,
                Err(e) => {
                    eprintln!("convscope: {e}");
                    std::process::exit(1);
                }
            };
            tracing::info!(addr = %app.local_addr(), models = app.state().registry.names().len(), "serving");
            if let Err(e) = app.run_until_stopped().await {
                eprintln!("convscope: {e}");
                std::process::exit(1);
            }
        }
    }
}
