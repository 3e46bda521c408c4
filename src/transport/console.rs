//! The browser console: a one-page MQTT client (web/console.html with MQTT.js,
//! web/mqtt.min.js) served over plain HTTP on the `ws` / `wss` listeners at `GET /console`.
//!
//! It answers exactly one request per connection and closes it. The files are compiled into
//! the binary; nothing is read from disk, and no path from the request reaches the
//! filesystem. This module must not grow into a web server: anything beyond these two static
//! files belongs to the admin HTTP API.

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::http::StatusCode;

/// Path of the console page (defined in `config`, which refuses it as a `ws_path`).
pub use crate::config::CONSOLE_PAGE_PATH as PAGE_PATH;
const SCRIPT_PATH: &str = "/console/mqtt.min.js";

const PAGE: &str = include_str!("../../web/console.html");
/// MQTT.js browser bundle (MIT, web/LICENSE-mqtt.js).
const SCRIPT: &[u8] = include_bytes!("../../web/mqtt.min.js");

/// Answer a plain HTTP request: the console page, its script, or 404 / 405.
pub async fn serve<W: AsyncWrite + Unpin>(w: &mut W, method: &str, path: &str) {
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        respond(w, StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"method not allowed\n").await;
        return;
    }
    let (content_type, body): (&str, &[u8]) = match path {
        "/console" | "/console/" => ("text/html; charset=utf-8", PAGE.as_bytes()),
        SCRIPT_PATH => ("text/javascript; charset=utf-8", SCRIPT),
        _ => {
            respond(w, StatusCode::NOT_FOUND, "text/plain", b"not found\n").await;
            return;
        }
    };
    respond_inner(w, StatusCode::OK, content_type, body, head_only).await;
}

/// Write a complete `Connection: close` response and shut the stream down.
pub async fn respond<W: AsyncWrite + Unpin>(w: &mut W, status: StatusCode, content_type: &str, body: &[u8]) {
    respond_inner(w, status, content_type, body, false).await;
}

async fn respond_inner<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    // Errors mean the browser went away; there is no one left to tell.
    let _ = w.write_all(head.as_bytes()).await;
    if !head_only {
        let _ = w.write_all(body).await;
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}
