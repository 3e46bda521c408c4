//! `lmq-gateway` command line: parse, load config, run.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use lmq_gateway::config::{Config, LogFormat};
use lmq_gateway::gateway::Gateway;

/// Stateless MQTT 3.1.1 / 5.0 gateway in the style of Alibaba Cloud LMQ.
///
/// Devices connect over MQTT (default port 1883); every message is stored in the core
/// service (the embedded log by default) before it is acknowledged.
#[derive(Parser)]
#[command(name = "lmq-gateway", version, about, long_about = None)]
struct Cli {
    /// Configuration file (every option is documented in the shipped gateway.yaml).
    #[arg(short, long, global = true, default_value = "gateway.yaml", env = "LMQ_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Serve,
    /// Validate the configuration file and print the effective settings.
    CheckConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config =
        Config::load(&cli.config).with_context(|| format!("invalid configuration {}", cli.config.display()))?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("{} is valid; effective settings:\n", cli.config.display());
            print!("{}", serde_yaml_ng::to_string(&config)?);
            Ok(())
        }
        Command::Serve => {
            init_logging(&config);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
