//! MQTT over WebSocket (`ws` / `wss` listeners): the HTTP upgrade on the configured path with
//! subprotocol `mqtt` or `mqttv3.1`, an optional Origin allow-list, and [`WsStream`], which
//! turns the message stream into plain bytes for the shared MQTT codec.
//!
//! MQTT packets may be split across WebSocket messages or packed several to one [MQTT-6.0.0-2];
//! the adapter therefore only concatenates binary payloads and never looks at MQTT framing.
//! Text frames are a protocol error [MQTT-6.0.0-1] and close the connection.
//!
//! The request head is read here first, so a plain HTTP `GET /console` (no Upgrade) goes to
//! [`super::console`] on the same port. This module must not block the accept loop, and
//! must not buffer more than one bounded request head and one bounded message per client.
//!
//! `ws_stream_tungstenite` does this adaptation too, but for `async-tungstenite` and the
//! `futures` I/O traits; a second WebSocket stack plus compatibility shims for ~80 lines of
//! adapter was not worth it.

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream as _};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::{console, Rewind, Stream, TransportError};
use crate::config::ListenerConfig;

/// Subprotocols we speak, in the names MQTT 3.1.1/5.0 (`mqtt`) and 3.1 (`mqttv3.1`) use.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// Largest HTTP request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// tungstenite's read buffer, allocated (and zeroed) per connection at the upgrade; larger
/// frames are read into a buffer of their own size, up to the message limit.
const READ_BUFFER: usize = 8 * 1024;
/// Largest WebSocket message one write becomes: the connection's output buffer is bounded
/// (`mqtt.max_output_buffer_bytes`), and so is what it hands to tungstenite at once.
const MAX_WRITE: usize = 64 * 1024;
/// Most bytes tungstenite holds for writing: one message of [`MAX_WRITE`] (a write waits
/// until the previous ones are out) or the pongs and close frame it answers with on its own.
/// Pings from a client that does not read would otherwise queue pongs without end; beyond
/// this only the latest pong is kept, as RFC 6455 5.5.3 allows.
const MAX_WRITE_BUFFER: usize = MAX_WRITE + 1024;

/// WebSocket settings of one listener.
#[derive(Debug, Clone)]
pub struct WsSettings {
    pub path: String,
    pub allowed_origins: Vec<String>,
    /// Largest WebSocket message (and frame) accepted: the largest MQTT packet. A frame
    /// announcing more is refused from its header, before its payload is read, so a client
    /// (before CONNECT too) makes the gateway buffer at most one packet's worth.
    pub max_message: usize,
}

impl WsSettings {
    pub fn new(config: &ListenerConfig, max_packet: usize) -> WsSettings {
        WsSettings {
            path: config.ws_path.clone(),
            allowed_origins: config.allowed_origins.iter().map(|o| normalize_origin(o)).collect(),
            // MQTT clients send one packet per message (or split one across several); packing
            // packets beyond the largest packet into one message is refused.
            max_message: max_packet,
        }
    }
}

fn normalize_origin(o: &str) -> String {
    o.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// Read the request head; answer plain HTTP (the console) or upgrade to WebSocket.
// The callback's `Result<Response, ErrorResponse>` shape is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
pub async fn accept(mut stream: Stream, settings: &WsSettings) -> Result<WsStream<Rewind<Stream>>, TransportError> {
    let mut head = BytesMut::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() >= MAX_HEAD {
            console::respond(&mut stream, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "text/plain", b"").await;
            return Err(TransportError::WebSocket("request head too large".into()));
        }
        let mut chunk = [0u8; 1024];
        let want = (MAX_HEAD - head.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(TransportError::WebSocket("closed before the request head ended".into()));
        }
        head.extend_from_slice(&chunk[..n]);
    };

    let (method, path, upgrade) = {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => {
                console::respond(&mut stream, StatusCode::BAD_REQUEST, "text/plain", b"bad request\n").await;
                return Err(TransportError::WebSocket("malformed HTTP request".into()));
            }
        }
        let upgrade = req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade")
                && std::str::from_utf8(h.value).is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        });
        (req.method.unwrap_or("").to_string(), req.path.unwrap_or("").to_string(), upgrade)
    };

    if !upgrade {
        let path = path.split('?').next().unwrap_or("");
        if path == settings.path {
            console::respond(&mut stream, StatusCode::UPGRADE_REQUIRED, "text/plain", b"WebSocket upgrade required\n")
                .await;
        } else {
            console::serve(&mut stream, &method, path).await;
        }
        return Err(TransportError::HttpServed);
    }

    let mut config = WebSocketConfig::default();
    config.read_buffer_size = READ_BUFFER;
    // Frames go to the stream as they are queued (each write is flushed anyway).
    config.write_buffer_size = 0;
    config.max_write_buffer_size = MAX_WRITE_BUFFER;
    config.max_message_size = Some(settings.max_message);
    config.max_frame_size = Some(settings.max_message);
    let check = |req: &Request, resp: Response| check_upgrade(req, resp, settings);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(Rewind::new(head.freeze(), stream), check, Some(config))
        .await
        .map_err(|e| TransportError::WebSocket(e.to_string()))?;
    Ok(WsStream::new(ws))
}

/// Path, Origin and subprotocol checks; answers with the subprotocol the client offered.
#[allow(clippy::result_large_err)]
fn check_upgrade(req: &Request, mut resp: Response, settings: &WsSettings) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut r = ErrorResponse::new(Some(format!("{why}\n")));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != settings.path {
        return Err(refuse(StatusCode::NOT_FOUND, "no WebSocket endpoint here"));
    }
    // With an allow-list, a request must name an allowed Origin: one without any (a script
    // or tool, not a browser) could otherwise pass for anything.
    if !settings.allowed_origins.is_empty() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok()).map(normalize_origin);
        if !origin.is_some_and(|o| settings.allowed_origins.contains(&o)) {
            return Err(refuse(StatusCode::FORBIDDEN, "origin missing or not allowed"));
        }
    }
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| SUBPROTOCOLS.contains(p));
    match offered {
        Some(p) => {
            resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(static_name(p)));
            Ok(resp)
        }
        None => Err(refuse(StatusCode::BAD_REQUEST, "subprotocol mqtt or mqttv3.1 required")),
    }
}

fn static_name(p: &str) -> &'static str {
    SUBPROTOCOLS.iter().find(|s| **s == p).copied().unwrap_or(SUBPROTOCOLS[0])
}

/// A WebSocket connection seen as a byte stream: reads concatenate binary messages, each
/// write becomes one binary message.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    read: Bytes,
    eof: bool,
}

impl<S> WsStream<S> {
    pub fn new(inner: WebSocketStream<S>) -> WsStream<S> {
        WsStream { inner, read: Bytes::new(), eof: false }
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.read = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket [MQTT-6.0.0-1]",
                    )))
                }
                // tungstenite answers pings and close frames itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Everything queued before (pongs included) goes out first, so the message always
        // fits under MAX_WRITE_BUFFER.
        ready!(Pin::new(&mut self.inner).poll_flush(cx)).map_err(ws_err)?;
        let buf = &buf[..buf.len().min(MAX_WRITE)];
        Pin::new(&mut self.inner).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(ws_err)?;
        // Start sending now; the caller's flush (or next write) completes it.
        if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_flush(cx) {
            return Poll::Ready(Err(ws_err(e)));
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(ws_err)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(ws_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    fn settings() -> WsSettings {
        WsSettings { path: "/mqtt".into(), allowed_origins: Vec::new(), max_message: 1024 }
    }

    /// A client that sends pings and never reads makes the gateway hold a bounded number of
    /// pongs, not one per ping (found by the `ws` fuzz target: they were all queued).
    #[tokio::test]
    async fn pongs_for_a_client_that_does_not_read_are_bounded() {
        const PINGS: usize = 2000;
        let (client_io, server_io) = tokio::io::duplex(4096);
        let (all_read, pings_done) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let mut ws = accept(Box::new(server_io), &settings()).await.unwrap();
            let mut buf = [0u8; 16];
            let n = ws.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"x");
            all_read.send(()).unwrap();
            ws.write_all(b"done").await.unwrap();
            ws.flush().await.unwrap();
            // Keep reading (and so writing the last pong) until the client has gone.
            while matches!(ws.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let mut request = "ws://gateway/mqtt".into_client_request().unwrap();
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        let (mut client, _) = tokio_tungstenite::client_async(request, client_io).await.unwrap();
        // 2000 pings of 125 bytes: 250 KiB of pongs if every one waited.
        for _ in 0..PINGS {
            client.send(Message::Ping(Bytes::from_static(&[7; 125]))).await.unwrap();
        }
        client.send(Message::Binary(Bytes::from_static(b"x"))).await.unwrap();
        // Every ping has been answered (or not) before the client reads anything.
        pings_done.await.unwrap();
        let mut pongs = 0;
        loop {
            match client.next().await.unwrap().unwrap() {
                Message::Pong(_) => pongs += 1,
                Message::Binary(b) => {
                    assert_eq!(&b[..], b"done");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // What the pipe held, what the write buffer may hold, and the latest pong.
        let bound = (4096 + MAX_WRITE_BUFFER) / 127 + 1;
        assert!(pongs > 0 && pongs <= bound, "{pongs} pongs for {PINGS} pings (bound {bound})");
        client.close(None).await.unwrap();
        server.await.unwrap();
    }

    /// With pongs waiting, a write of the largest message still goes through.
    #[tokio::test]
    async fn writes_after_queued_pongs_succeed() {
        let (client_io, server_io) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut ws = accept(Box::new(server_io), &settings()).await.unwrap();
            let mut buf = [0u8; 16];
            let n = ws.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"x");
            let big = vec![1u8; 3 * MAX_WRITE];
            ws.write_all(&big).await.unwrap();
            ws.flush().await.unwrap();
            while matches!(ws.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let mut request = "ws://gateway/mqtt".into_client_request().unwrap();
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        let (mut client, _) = tokio_tungstenite::client_async(request, client_io).await.unwrap();
        for _ in 0..1000 {
            client.send(Message::Ping(Bytes::from_static(&[7; 125]))).await.unwrap();
        }
        client.send(Message::Binary(Bytes::from_static(b"x"))).await.unwrap();
        let mut got = 0;
        while got < 3 * MAX_WRITE {
            match client.next().await.unwrap().unwrap() {
                Message::Pong(_) => {}
                Message::Binary(b) => {
                    assert!(b.len() <= MAX_WRITE);
                    got += b.len();
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, 3 * MAX_WRITE);
        client.close(None).await.unwrap();
        server.await.unwrap();
    }
}
