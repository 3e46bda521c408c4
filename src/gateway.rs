//! Composition root: builds the core service, router, registry and listeners from a
//! [`Config`], and shuts them down in order. `main` and the integration tests both use it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::backend::embedded::EmbeddedCore;
use crate::backend::{BackendError, SharedCoreService};
use crate::config::{Config, CoreKind};
use crate::context::Context;
use crate::limits::Limits;
use crate::router::mapping::TopicMap;
use crate::router::{Router, RouterLimits};
use crate::server::Listener;
use crate::session::registry::{Kick, Registry};

/// Why [`Gateway::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The core service could not be opened, or refused what the start asked of it.
    #[error(transparent)]
    Core(#[from] BackendError),
    #[cfg(feature = "kafka")]
    #[error(transparent)]
    Kafka(#[from] crate::backend::kafka::OpenError),
    /// `core.kind` names a core service this binary was built without.
    #[error("core.kind: {0} needs the `{0}` cargo feature")]
    NotBuilt(&'static str),
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener `{name}`: no local address: {source}")]
    LocalAddr {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Router(#[from] crate::router::RouterError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("cannot create the delay topics: {0}")]
    DelayTopics(#[source] BackendError),
    #[error(transparent)]
    Admin(#[from] crate::admin::StartError),
}

/// A running gateway.
pub struct Gateway {
    pub ctx: Arc<Context>,
    /// Bound address of each listener, in config order (port 0 resolved).
    pub addrs: Vec<(String, SocketAddr)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// TLS state of each `tls` / `wss` listener, by name.
    tls: Vec<(String, Arc<crate::transport::tls::ReloadingTls>)>,
    /// Admin API (`admin.enabled`): serves until the very end of shutdown.
    admin: Option<crate::admin::AdminServer>,
}

impl Gateway {
    /// Open the core service named in the config, start the router and bind every listener.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let backend: SharedCoreService = match config.core.kind {
            CoreKind::Embedded => EmbeddedCore::open(&config.core.embedded, &config.topics.events_topic).await?,
            #[cfg(feature = "kafka")]
            CoreKind::Kafka => {
                crate::backend::kafka::KafkaCore::open(&config.core.kafka, &config.topics.events_topic).await?
            }
            #[cfg(not(feature = "kafka"))]
            CoreKind::Kafka => return Err(StartError::NotBuilt("kafka")),
            #[cfg(feature = "rocketmq")]
            CoreKind::Rocketmq => {
                crate::backend::rocketmq::RocketmqCore::open(&config.core.rocketmq, &config.topics.events_topic).await?
            }
            #[cfg(not(feature = "rocketmq"))]
            CoreKind::Rocketmq => return Err(StartError::NotBuilt("rocketmq")),
        };
        Self::start_with_backend(config, backend).await
    }

    /// Start on an already opened core service (tests wrap one to inject failures).
    pub async fn start_with_backend(config: Config, backend: SharedCoreService) -> Result<Gateway, StartError> {
        // Metrics first: the router and the limits count into them.
        let metrics = Arc::new(crate::metrics::Metrics::new());
        metrics.listeners_known(config.listeners.iter().map(|l| (l.name.as_str(), l.transport.as_str())));
        let limits = Limits::new(config.limits.clone(), &metrics);
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let bound = Listener::bind(l, limits.max_packet_size()).await.map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            listeners.push(bound);
        }
        let addrs: Vec<(String, SocketAddr)> = listeners
            .iter()
            .map(|l| {
                let name = l.config.name.clone();
                match l.local_addr() {
                    Ok(addr) => Ok((name, addr)),
                    Err(source) => Err(StartError::LocalAddr { name, source }),
                }
            })
            .collect::<Result<_, _>>()?;
        let tls: Vec<_> = listeners.iter().filter_map(|l| Some((l.config.name.clone(), l.tls()?))).collect();
        let gateway_id = config.gateway_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into());
            let port = addrs.first().map(|(_, a)| a.port()).unwrap_or(0);
            format!("{host}:{port}")
        });
        crate::msgid::init(&gateway_id);
        let (tracer, trace_events) =
            crate::trace::Tracer::new(&config.trace, &gateway_id, metrics.trace_dropped.clone());
        let router_stats = crate::router::RouterStats::new(&metrics, tracer.clone());
        let router = Router::start(
            backend.clone(),
            TopicMap::new(&config.topics, config.reserved_topics()),
            router_stats,
            RouterLimits::new(&config.limits),
        )
        .await?;
        let auth = Arc::new(crate::auth::Authenticator::start(&config.auth, backend.clone()).await?);
        let delay = crate::delay::Delays::new(&config, metrics.delay.clone());
        crate::delay::create_topics(&delay.levels, &backend, &config.delay).await.map_err(StartError::DelayTopics)?;
        let ctx = Arc::new(Context {
            tracer,
            delay,
            auth,
            connections_total: Arc::new(tokio::sync::Semaphore::new(config.max_connections_total)),
            limits,
            config,
            gateway_id,
            backend,
            router,
            registry: Registry::new(),
            next_conn_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            metrics,
        });
        // Admin API, bound before anything is served so that a taken port stops the start cleanly.
        let admin =
            if ctx.config.admin.enabled { Some(crate::admin::AdminServer::start(ctx.clone()).await?) } else { None };
        let mut tasks: Vec<_> = listeners.into_iter().map(|l| tokio::spawn(l.serve(ctx.clone()))).collect();
        tasks.push(tokio::spawn(crate::session::expiry::run(
            ctx.backend.clone(),
            ctx.registry.clone(),
            Duration::from_secs(600),
            ctx.shutdown.clone(),
        )));
        if admin.is_some() {
            let backlog = crate::session::backlog::Backlog::new(
                ctx.backend.clone(),
                ctx.registry.clone(),
                ctx.router.clone(),
                ctx.metrics.clone(),
                ctx.config.backlog.clone(),
                ctx.config.limits.max_core_topics,
            );
            tasks.push(tokio::spawn(crate::session::backlog::run(backlog, ctx.shutdown.clone())));
        }
        tasks.push(tokio::spawn(crate::session::takeover::run(
            ctx.backend.clone(),
            (
                ctx.config.topics.events_topic.clone(),
                crate::session::reset::control_topic(&ctx.config.topics.reserved_prefix),
            ),
            ctx.gateway_id.clone(),
            ctx.registry.clone(),
            ctx.shutdown.clone(),
        )));
        tasks.push(tokio::spawn(crate::delay::run(
            ctx.delay.clone(),
            ctx.backend.clone(),
            ctx.router.clone(),
            ctx.config.delay.clone(),
            ctx.gateway_id.clone(),
            ctx.shutdown.clone(),
        )));
        if let Some(events) = trace_events {
            tasks.push(tokio::spawn(crate::trace::run_writer(
                ctx.backend.clone(),
                (ctx.config.trace.topic.clone(), ctx.config.trace.partitions, ctx.config.trace.retention_ms()),
                events,
                ctx.metrics.trace_dropped.clone(),
                ctx.shutdown.clone(),
            )));
        }
        for (name, addr) in &addrs {
            tracing::info!(listener = %name, %addr, "listening");
        }
        for (name, t) in tls.iter().filter(|(_, t)| t.is_self_signed()) {
            tracing::info!(
                listener = %name,
                fingerprint = %t.fingerprint(),
                names = %t.self_signed_names().join(","),
                "self-signed TLS certificate made at start; clients check it by this SHA-256 fingerprint \
                 (openssl x509 -fingerprint -sha256)"
            );
        }
        warn_demo_secrets(&ctx.config, &addrs, admin.as_ref().map(|a| a.addr));
        Ok(Gateway { ctx, addrs, tasks, tls, admin })
    }

    /// Bound address of the admin API, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    /// SHA-256 fingerprint (colon-separated hex) of the certificate the `tls` / `wss`
    /// listener `name` presents now; `None` for other listeners.
    pub fn tls_fingerprint(&self, name: &str) -> Option<String> {
        self.tls.iter().find(|(n, _)| n == name).map(|(_, t)| t.fingerprint())
    }

    /// Address of the first listener.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].1
    }

    /// Graceful shutdown: `/readyz` turns false, stop accepting, disconnect clients (MQTT 5
    /// reason 0x8B) and let them save their sessions, then flush and close the core service;
    /// the admin API stops last.
    pub async fn shutdown(self) {
        let kicked = self.ctx.registry.kick_all(Kick::Shutdown);
        self.ctx.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        if !self.ctx.registry.drained(Duration::from_secs(10)).await {
            tracing::warn!("some connections did not finish within 10 s");
        }
        self.ctx.backend.shutdown().await;
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        tracing::info!(kicked, "gateway stopped");
    }
}

/// Secrets written in the repository's examples: anyone can read them.
const DEMO_SECRETS: [&str; 2] = ["demo-secret-change-me", "change-me-admin-token"];

/// A warning per shipped demo secret still in use where other hosts can reach it: an access
/// key's secret with a listener on a non-loopback address, the admin token with a non-loopback
/// admin port.
fn warn_demo_secrets(config: &Config, listeners: &[(String, SocketAddr)], admin: Option<SocketAddr>) {
    let exposed = |a: &SocketAddr| !a.ip().is_loopback();
    if listeners.iter().any(|(_, a)| exposed(a)) {
        if let Ok(auth) = config.auth.resolve() {
            for key in auth.access_keys.iter().filter(|k| DEMO_SECRETS.contains(&k.secret.expose())) {
                tracing::warn!(
                    access_key = key.id,
                    "access key uses the shipped demo secret on a non-loopback listener: anyone can sign as it \
                     (change it, or set LMQ_ACCESS_KEY_<ID>_SECRET)"
                );
            }
        }
    }
    let admin_token = config.admin.resolved_token();
    if admin.is_some_and(|a| exposed(&a)) && admin_token.is_some_and(|t| DEMO_SECRETS.contains(&t.expose())) {
        tracing::warn!("the admin API uses the shipped demo token on a non-loopback address: set LMQ_ADMIN_TOKEN");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start errors keep what they wrap as their source, with the messages they had.
    #[test]
    fn start_errors_keep_their_source_and_message() {
        let e = StartError::Bind {
            name: "tcp".into(),
            addr: "127.0.0.1:1883".parse().expect("address"),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert!(e.to_string().starts_with("listener `tcp` cannot bind 127.0.0.1:1883: "), "{e}");
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(source.map(|s| s.kind()), Some(std::io::ErrorKind::AddrInUse));
        let e = StartError::DelayTopics(BackendError::unavailable("down"));
        assert_eq!(e.to_string(), "cannot create the delay topics: core service unavailable: down");
        assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<BackendError>()));
        let e = StartError::from(BackendError::Closed);
        assert_eq!(e.to_string(), "core service closed");
        assert_eq!(StartError::NotBuilt("kafka").to_string(), "core.kind: kafka needs the `kafka` cargo feature");
        #[cfg(feature = "kafka")]
        {
            let e = StartError::from(crate::backend::kafka::OpenError::TopicsMissing(vec!["a".into(), "b".into()]));
            assert!(e.to_string().starts_with("Kafka topics missing: a, b (create them"), "{e}");
        }
    }
}
