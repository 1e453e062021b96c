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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models directory over HTTP.
    Serve(Settings),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn".into()),
        )
        .init();
    let Cli { command } = Cli::parse();
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
