//! Transports: turn an accepted TCP socket into the byte stream the MQTT connection reads.
//!
//! Per listener, in this order and only as configured: PROXY protocol header ([`proxy`]) →
//! TLS ([`tls`]) → WebSocket upgrade or the browser console page ([`ws`], [`console`]). The
//! result is one [`Stream`] type and a [`ConnInfo`] (real client address, listener,
//! transport, client-certificate CN), so every transport shares the same codec and session
//! path in `connection`.
//!
//! Everything here runs inside the connection's own task, under the listener's handshake
//! timeout (`server` applies it); nothing here may run in the accept loop, know about MQTT
//! packets, or panic on a client's bytes.

pub mod console;
pub mod proxy;
pub mod tls;
pub mod ws;

use bytes::{Buf, Bytes};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{ListenerConfig, Transport};

/// Any byte stream a connection can run on.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// The stream of one client connection, whatever its transport.
pub type Stream = Box<dyn AsyncStream>;

/// What a connection knows about where it came from.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address: from the PROXY header when the listener expects one, else the
    /// socket's peer.
    pub peer: SocketAddr,
    /// Listener name (logs, metrics).
    pub listener: Arc<str>,
    pub transport: Transport,
    /// Subject CN of a verified client certificate (mTLS); authentication may use it.
    pub tls_cn: Option<String>,
}

/// Why a connection ended before it reached MQTT.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("PROXY protocol: {0}")]
    Proxy(String),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// Not an error: the request was plain HTTP (the console page) and has been answered.
    #[error("HTTP request answered")]
    HttpServed,
}

/// Per-listener handshake state, built once at bind time and shared by its connections.
pub struct Acceptor {
    name: Arc<str>,
    transport: Transport,
    proxy_protocol: bool,
    proxy_trusted: Vec<ipnet::IpNet>,
    tls: Option<Arc<tls::ReloadingTls>>,
    ws: ws::WsSettings,
}

impl Acceptor {
    /// Load certificates (a TLS listener with unreadable files fails here, at start-up).
    pub fn new(config: &ListenerConfig, max_packet: usize) -> Result<Acceptor, tls::TlsError> {
        let tls = match (&config.tls, config.transport.is_tls()) {
            (Some(t), true) => {
                let alpn: &[u8] = if config.transport == Transport::Wss { b"http/1.1" } else { b"mqtt" };
                Some(tls::ReloadingTls::load(t, alpn)?)
            }
            _ => None,
        };
        Ok(Acceptor {
            name: config.name.clone().into(),
            transport: config.transport,
            proxy_protocol: config.proxy_protocol,
            proxy_trusted: config.proxy_trusted_networks.clone(),
            tls,
            ws: ws::WsSettings::new(config, max_packet),
        })
    }

    /// The reloadable TLS state, for the reload task.
    pub fn tls(&self) -> Option<&Arc<tls::ReloadingTls>> {
        self.tls.as_ref()
    }

    /// PROXY → TLS → WebSocket as configured. The caller bounds it with a timeout.
    pub async fn accept(&self, mut tcp: TcpStream, peer: SocketAddr) -> Result<(Stream, ConnInfo), TransportError> {
        let mut info = ConnInfo { peer, listener: self.name.clone(), transport: self.transport, tls_cn: None };
        let mut prefix = Bytes::new();
        if self.proxy_protocol {
            let ip = peer.ip().to_canonical();
            if !self.proxy_trusted.iter().any(|n| n.contains(&ip)) {
                return Err(TransportError::Proxy(format!("{ip} is not a trusted proxy (proxy_trusted_networks)")));
            }
            let (source, rest) = proxy::read_header(&mut tcp).await?;
            if let Some(source) = source {
                info.peer = source;
            }
            prefix = rest;
        }
        let stream: Stream = match &self.tls {
            Some(tls) => {
                let (s, cn) = tls.accept(Rewind::new(prefix, tcp)).await?;
                info.tls_cn = cn;
                Box::new(s)
            }
            None if prefix.is_empty() => Box::new(tcp),
            None => Box::new(Rewind::new(prefix, tcp)),
        };
        if self.transport.is_websocket() {
            let ws = ws::accept(stream, &self.ws).await?;
            return Ok((Box::new(ws), info));
        }
        Ok((stream, info))
    }
}

/// A stream that first yields bytes already read from it (past a PROXY header or an HTTP
/// request head), then reads on.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_yields_prefix_then_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello "), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
