//! Listeners and the process-wide context shared by all connections.
//!
//! The accept loop only accepts: a connection permit is taken *before* `accept` (so a full
//! listener leaves new clients in the kernel backlog instead of spawning unbounded tasks),
//! and everything else — including any handshake (PROXY header, TLS, WebSocket upgrade, see
//! `transport`) — runs in the connection's own task under the listener's handshake timeout,
//! so a slow or hostile handshake never delays another client. A gateway-wide semaphore
//! (`max_connections_total`) is taken the same way as the listener's.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backend::SharedCoreService;
use crate::config::{Config, ListenerConfig};
use crate::limits::Limits;
use crate::router::Router;
use crate::session::registry::Registry;
use crate::transport::{Acceptor, TransportError};

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

/// A bound listener, ready to serve.
pub struct Listener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
    acceptor: Arc<Acceptor>,
}

impl Listener {
    /// Bind the socket and load the listener's certificates; `max_packet` bounds WebSocket
    /// messages.
    pub async fn bind(config: &ListenerConfig, max_packet: usize) -> std::io::Result<Listener> {
        let acceptor = Acceptor::new(config, max_packet).map_err(std::io::Error::other)?;
        let socket = TcpListener::bind(config.bind).await?;
        Ok(Listener { config: config.clone(), socket, acceptor: Arc::new(acceptor) })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The listener's TLS state (`tls` / `wss`): its certificate's fingerprint.
    pub fn tls(&self) -> Option<Arc<crate::transport::tls::ReloadingTls>> {
        self.acceptor.tls().cloned()
    }

    /// Accept until shutdown. A permit of this listener and one of the gateway-wide limit are
    /// both held for the whole life of each connection, handshake included.
    pub async fn serve(self, ctx: Arc<Context>) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        let name: Arc<str> = self.config.name.clone().into();
        let handshake_timeout = Duration::from_secs(self.config.handshake_timeout_secs);
        if let Some(tls) = self.acceptor.tls().filter(|t| !t.is_self_signed()) {
            tokio::spawn(tls.clone().watch(name.clone(), ctx.shutdown.clone()));
        }
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = ctx.shutdown.cancelled() => return,
            };
            let total = tokio::select! {
                p = ctx.connections_total.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = ctx.shutdown.cancelled() => return,
            };
            let accepted = tokio::select! {
                a = self.socket.accept() => a,
                _ = ctx.shutdown.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let ctx = ctx.clone();
                    let acceptor = self.acceptor.clone();
                    tokio::spawn(async move {
                        let _permits = (permit, total);
                        let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream, peer));
                        let result = tokio::select! {
                            r = handshake => r,
                            _ = ctx.shutdown.cancelled() => return,
                        };
                        match result {
                            Ok(Ok((stream, info))) => crate::connection::run(ctx, stream, info).await,
                            Ok(Err(TransportError::HttpServed)) => {}
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "handshake failed"),
                            Err(_) => tracing::debug!(%peer, "handshake timed out after {handshake_timeout:?}"),
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
