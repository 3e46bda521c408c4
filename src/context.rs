//! The process-wide context shared by all connections: [`Context`].
//!
//! `gateway` builds it; `server` hands it to every connection it accepts, `connection` and the
//! admin API read it. It lives in its own module, below both `connection` and `server`, so
//! that data flows one way: `server` runs `connection`, and `connection` does not import
//! `server`. This module only defines the struct; it must not start anything.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backend::SharedCoreService;
use crate::config::Config;
use crate::limits::Limits;
use crate::router::Router;
use crate::session::registry::Registry;

/// Everything a connection needs, shared.
pub struct Context {
    pub config: Config,
    pub gateway_id: String,
    pub backend: SharedCoreService,
    pub router: Arc<Router>,
    pub registry: Arc<Registry>,
    pub limits: Limits,
    /// Who clients are and what they may do (SPEC §4).
    pub auth: Arc<crate::auth::Authenticator>,
    pub next_conn_id: AtomicU64,
    /// Gateway-wide connection limit (`max_connections_total`), shared by all listeners.
    pub connections_total: Arc<Semaphore>,
    /// Cancelled when the gateway starts shutting down.
    pub shutdown: CancellationToken,
    /// Every metric (`lmq_*`), served by the admin API.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Message trace (off unless `trace.enabled`).
    pub tracer: Arc<crate::trace::Tracer>,
    /// Delayed messages: the delay clock and levels the publish path uses.
    pub delay: Arc<crate::delay::Delays>,
}
