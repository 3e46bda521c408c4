//! `lmq-gateway healthcheck`: the client side of `/healthz`, for container health checks in
//! images without curl. A plain HTTP/1.1 GET over TCP, bounded by a timeout.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

/// What `healthcheck` probes when no URL is given: the admin API's `/healthz` when it is
/// enabled (an unspecified bind address is probed on loopback), else a TCP connect to the
/// first MQTT listener.
pub fn default_target(config: &Config) -> Result<String, crate::config::ConfigError> {
    let loopback = |mut a: SocketAddr| {
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        a
    };
    if config.admin.enabled {
        return Ok(format!("http://{}/healthz", loopback(config.admin.bind_addr()?)));
    }
    Ok(config.listeners.first().map(|l| format!("tcp://{}", loopback(l.bind))).unwrap_or_default())
}

/// Probe `target` (`http://host:port/path` or `tcp://host:port`); `Ok` when it is healthy.
pub async fn probe(target: &str, timeout: Duration) -> Result<(), String> {
    tokio::time::timeout(timeout, probe_inner(target))
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {target} within {timeout:?}")))
}

async fn probe_inner(target: &str) -> Result<(), String> {
    if let Some(addr) = target.strip_prefix("tcp://") {
        return tokio::net::TcpStream::connect(addr).await.map(|_| ()).map_err(|e| format!("{addr}: {e}"));
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| format!("`{target}`: use http://… or tcp://…"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.map_err(|e| format!("{host}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    if status == "200" {
        Ok(())
    } else {
        Err(format!("{target} answered `{}`", status_line.lines().next().unwrap_or("")))
    }
}
