//! Listeners and the process-wide context shared by all connections.
//!
//! The accept loop only accepts: a connection permit is taken *before* `accept` (so a full
//! listener leaves new clients in the kernel backlog instead of spawning unbounded tasks),
//! and everything else — including any handshake — runs in the connection's own task.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::backend::SharedCoreService;
use crate::config::{Config, ListenerConfig};
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
    pub next_conn_id: AtomicU64,
    /// Cancelled when the gateway starts shutting down.
    pub shutdown: CancellationToken,
}

/// A bound listener, ready to serve.
pub struct Listener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
}

impl Listener {
    pub async fn bind(config: &ListenerConfig) -> std::io::Result<Listener> {
        let socket = TcpListener::bind(config.bind).await?;
        Ok(Listener { config: config.clone(), socket })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accept until shutdown.
    pub async fn serve(self, ctx: Arc<Context>) {
        let permits = Arc::new(Semaphore::new(self.config.max_connections));
        let name: Arc<str> = self.config.name.clone().into();
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
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
                    let name = name.clone();
                    tokio::spawn(async move {
                        crate::connection::run(ctx, stream, peer, name).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}
