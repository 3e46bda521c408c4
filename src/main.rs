//! `lmq-gateway` command line: parse, load config, run.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use lmq_gateway::auth::signature;
use lmq_gateway::auth::token::TokenType;
use lmq_gateway::auth::KeyRing;
use lmq_gateway::config::auth::Secret;
use lmq_gateway::config::{Config, LogFormat};
use lmq_gateway::gateway::Gateway;

#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Validate the configuration file and print the effective settings (secrets redacted).
    CheckConfig,
    /// Print the MQTT user name and password of signature mode for one ClientId.
    ///
    /// The password is Base64(HMAC-SHA1(AccessKeySecret, ClientId)); the secret is taken from
    /// the access key in the configuration (`auth.access_keys`, or its
    /// LMQ_ACCESS_KEY_<ID>_SECRET variable) unless --secret is given.
    ///
    /// Example: lmq-gateway sign --client-id GID_demo@@@dev1
    Sign {
        /// ClientId the device connects with, e.g. GID_demo@@@dev1.
        #[arg(long)]
        client_id: String,
        /// Access key to sign with; default: the first one in `auth.access_keys`.
        #[arg(long)]
        access_key_id: Option<String>,
        /// Use this AccessKeySecret instead of the configured one (needs --access-key-id).
        #[arg(long, env = "LMQ_SIGN_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// InstanceId in the user name; default: `auth.instance_id` (any value is accepted when
        /// that is unset).
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// Issue tokens for token mode.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Exit 0 if the gateway answers, 1 if not (container health checks).
    ///
    /// Probes the admin API's /healthz when `admin.enabled`, else a TCP connect to the first
    /// listener.
    ///
    /// Example: lmq-gateway healthcheck --url http://127.0.0.1:8080/healthz
    Healthcheck {
        /// What to probe instead: http://host:port/path (expects 200) or tcp://host:port.
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token (a signed JWT) on standard output; how to connect with it goes to
    /// standard error.
    ///
    /// The token is signed with `auth.token.signing_secret` if set, else with the access key's
    /// secret. Resources must lie within the access key's own permissions.
    ///
    /// Example: lmq-gateway token issue --access-key-id demo-key --resources 'sensors/#' --actions R,W --ttl-secs 3600
    Issue {
        /// Access key the token is for (its id goes in the user name Token|<id>|<InstanceId>).
        #[arg(long)]
        access_key_id: String,
        /// Comma-separated topic filters the token grants (1 to 100), e.g. 'a/#,b/+'.
        #[arg(long, value_delimiter = ',', required = true)]
        resources: Vec<String>,
        /// Comma-separated actions: R (subscribe), W (publish), or both.
        #[arg(long, value_delimiter = ',', default_value = "R")]
        actions: Vec<String>,
        /// Lifetime in seconds: 60 to 2592000 (30 days), at most auth.token.max_ttl_secs.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config =
        Config::load(&cli.config).with_context(|| format!("invalid configuration {}", cli.config.display()))?;
    config.auth.validate().with_context(|| format!("invalid configuration {}", cli.config.display()))?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Sign { client_id, access_key_id, secret, instance_id } => {
            let keys = KeyRing::from_config(&config.auth)?;
            let (id, secret) = match (access_key_id, secret) {
                (Some(id), Some(secret)) => (id, Secret::new(secret)),
                (None, Some(_)) => anyhow::bail!("--secret needs --access-key-id"),
                (Some(id), None) => {
                    let key =
                        keys.access_key(&id).with_context(|| format!("no access key `{id}` in auth.access_keys"))?;
                    (id, key.secret.clone())
                }
                (None, None) => {
                    let key = keys.first_access_key().context("auth.access_keys is empty: add one or pass --secret")?;
                    (key.id.clone(), key.secret.clone())
                }
            };
            let instance =
                instance_id.or_else(|| keys.instance_id().map(str::to_owned)).unwrap_or_else(|| "lmq".into());
            println!("username: Signature|{id}|{instance}");
            println!("password: {}", signature::sign(secret.expose(), &client_id));
            Ok(())
        }
        Command::Token(TokenCommand::Issue { access_key_id, resources, actions, ttl_secs }) => {
            let keys = KeyRing::from_config(&config.auth)?;
            let token_type = match (actions.iter().any(|a| a == "R"), actions.iter().any(|a| a == "W")) {
                _ if actions.iter().any(|a| a != "R" && a != "W") => anyhow::bail!("--actions takes R, W or R,W"),
                (true, true) => TokenType::RW,
                (true, false) => TokenType::R,
                (false, true) => TokenType::W,
                (false, false) => anyhow::bail!("--actions takes R, W or R,W"),
            };
            let issued = keys.issue_token(&access_key_id, &resources, token_type, ttl_secs)?;
            println!("{}", issued.token);
            let instance = keys.instance_id().unwrap_or("lmq");
            eprintln!("token id (jti): {}, expires at {} ms since the epoch", issued.jti, issued.expire_ms);
            eprintln!("connect with username Token|{access_key_id}|{instance} and password {token_type}|<the token>");
            Ok(())
        }
        Command::Healthcheck { url, timeout_secs } => {
            let target = match url {
                Some(u) => u,
                None => lmq_gateway::admin::probe::default_target(&config)?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let timeout = std::time::Duration::from_secs(timeout_secs);
            match runtime.block_on(lmq_gateway::admin::probe::probe(&target, timeout)) {
                Ok(()) => {
                    println!("healthy: {target}");
                    Ok(())
                }
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    std::process::exit(1)
                }
            }
        }
        Command::CheckConfig => {
            use std::io::Write as _;
            let text = format!(
                "{} is valid; effective settings:\n\n{}",
                cli.config.display(),
                serde_yaml_ng::to_string(&config)?
            );
            // A reader that stops early (`| head`) is not an error of the configuration.
            match std::io::stdout().write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Serve => {
            init_logging(&config);
            no_transparent_huge_pages();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(serve(config))
        }
    }
}

/// Transparent huge pages off for this process, before the runtime's threads start. The
/// allocator asks the kernel for them on its heap, and the kernel then zeroes a whole 2 MiB
/// page at the first touch of a new heap region: measured at about 10 ms of one runtime thread
/// on a virtual machine, in the middle of whatever that thread was delivering (the QoS 0 p99 at
/// 20 k msg/s went from 8–10 ms to 1.3 ms without them; docs/benchmarks.md). The gateway's heap
/// is many small objects, not the large scans huge pages speed up.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off; latency may have spikes of milliseconds");
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
    // Colours only on a terminal: a log redirected to a file or collected by a container
    // runtime stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}
