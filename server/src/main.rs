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
