//! Listeners: they hand each connection the process-wide [`Context`] (defined in `context`).
//!
//! The accept loop only accepts: a connection permit is taken *before* `accept` (so a full
//! listener leaves new clients in the kernel backlog instead of spawning unbounded tasks),
//! and everything else — including any handshake (PROXY header, TLS, WebSocket upgrade, see
//! `transport`) — runs in the connection's own task under the listener's handshake timeout,
//! so a slow or hostile handshake never delays another client. A gateway-wide semaphore
//! (`max_connections_total`) is taken the same way as the listener's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ListenerConfig;
use crate::transport::{Acceptor, TransportError};

// Defined in `context`, so that `connection` (which `server` runs) need not import `server`.
pub use crate::context::Context;

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
                    // The task's own future stays a few words: the handshake (TLS, WebSocket,
                    // PROXY: kilobytes while it runs) and the connection each live in a box of
                    // their own, the handshake's freed before the connection's is made, instead
                    // of one task the size of the larger of the two for the connection's life.
                    tokio::spawn(async move {
                        let _permits = (permit, total);
                        let handshake =
                            Box::pin(tokio::time::timeout(handshake_timeout, acceptor.accept(stream, peer)));
                        let result = tokio::select! {
                            r = handshake => r,
                            _ = ctx.shutdown.cancelled() => return,
                        };
                        match result {
                            Ok(Ok((stream, info))) => Box::pin(crate::connection::run(ctx, stream, info)).await,
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
