//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by HAProxy, AWS NLB, nginx and
//! other load balancers, so that the real client address reaches events and logs.
//!
//! Parsing is `ppp`'s; this module only reads just enough bytes, bounds them, and maps the
//! result to a source address. It must not trust anything but the header's own framing: a
//! header that is malformed, too long or missing ends the connection, and bytes read past
//! the header are handed on untouched (they belong to TLS or MQTT).

use bytes::{Bytes, BytesMut};
use ppp::{v1, v2, HeaderResult, PartialResult};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::TransportError;

/// v1 is at most 107 bytes; v2 may carry TLVs (AWS, GCP add some), bounded here.
const MAX_HEADER: usize = 4096;

/// Read and parse one PROXY header. Returns the client's address (None for `LOCAL` / `UNKNOWN`
/// headers, e.g. a load balancer's health check: the socket's peer stays) and the bytes read
/// past the header.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Option<SocketAddr>, Bytes), TransportError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if !buf.is_empty() {
            if let Some(parsed) = parse(&buf)? {
                let (source, len) = parsed;
                let rest = buf.split_off(len).freeze();
                return Ok((source, rest));
            }
        }
        if buf.len() >= MAX_HEADER {
            return Err(TransportError::Proxy("header longer than 4096 bytes".into()));
        }
        // Read in small steps: only what a header can be, so little is over-read.
        let want = MAX_HEADER - buf.len();
        let mut chunk = [0u8; 256];
        let n = stream.read(&mut chunk[..want.min(256)]).await?;
        if n == 0 {
            return Err(TransportError::Proxy("connection closed inside the header".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)`: need more bytes. `Ok(Some((source, header_len)))`: complete.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, TransportError> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Some((source, h.header.len())))
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, _) => None,
            };
            Ok(Some((source, h.len())))
        }
        HeaderResult::V1(Err(e)) => Err(TransportError::Proxy(format!("malformed v1 header: {e}"))),
        HeaderResult::V2(Err(e)) => Err(TransportError::Proxy(format!("malformed v2 header: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn read(bytes: &[u8]) -> Result<(Option<SocketAddr>, Bytes), TransportError> {
        let (mut a, mut b) = tokio::io::duplex(8192);
        a.write_all(bytes).await.unwrap();
        drop(a);
        read_header(&mut b).await
    }

    #[tokio::test]
    async fn v1_gives_source_and_keeps_the_rest() {
        let (src, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n\x10\x00").await.unwrap();
        assert_eq!(src, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(&rest[..], b"\x10\x00");
        let (src, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 1883\r\n").await.unwrap();
        assert_eq!(src, Some("[2001:db8::1]:4000".parse().unwrap()));
        let (src, _) = read(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(src, None);
    }

    #[tokio::test]
    async fn v2_gives_source() {
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            ("198.51.100.9:4242".parse::<SocketAddr>().unwrap(), "10.0.0.1:1883".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"MQTT");
        let (src, rest) = read(&bytes).await.unwrap();
        assert_eq!(src, Some("198.51.100.9:4242".parse().unwrap()));
        assert_eq!(&rest[..], b"MQTT");
    }

    #[tokio::test]
    async fn malformed_or_missing_headers_are_refused() {
        for bad in [
            &b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c"[..],
            b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.1.1.1\r\n",
            b"PROXY TCP4 1.1.1.1 10.0.0.1 1 2", // closed before CRLF
            b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c",
        ] {
            assert!(read(bad).await.is_err(), "{bad:?}");
        }
        let long = vec![b'P'; 5000];
        assert!(read(&long).await.is_err());
    }
}
