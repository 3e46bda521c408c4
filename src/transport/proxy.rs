//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by HAProxy, AWS NLB, nginx and
//! other load balancers, so that the real client address reaches events and logs.
//!
//! Parsing is `ppp`'s; this module only reads just enough bytes, bounds them, hands `ppp`
//! whole v1 lines (it misjudges partial ones), and maps the result to a source address. It must not trust anything but the header's own framing: a
//! header that is malformed, too long or missing ends the connection, and bytes read past
//! the header are handed on untouched (they belong to TLS or MQTT).

use bytes::{Bytes, BytesMut};
use ppp::{v1, v2, PartialResult};
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

/// First bytes of every v2 header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// First bytes of every v1 header.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest v1 header, CRLF included.
const V1_MAX: usize = 107;

/// `Ok(None)`: need more bytes. `Ok(Some((source, header_len)))`: complete. The answer does
/// not depend on how the bytes were split into reads.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, TransportError> {
    if V2_SIGNATURE.starts_with(buf) || buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        parse_v1(buf)
    }
}

/// `ppp` judges a v1 line that has not ended yet as if it ended where the bytes do: a
/// destination port still being sent is an invalid port, a UTF-8 character cut in two is
/// invalid UTF-8, and `PROXY UNKNOWN \n` passes for a header only while nothing follows the
/// `\n`. It is therefore given whole lines only (up to CRLF), and before that only the prefix
/// is checked, so that bytes which cannot start a header are refused at once.
fn parse_v1(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, TransportError> {
    let malformed = |e: &dyn std::fmt::Display| TransportError::Proxy(format!("malformed v1 header: {e}"));
    let start = buf.len().min(V1_PREFIX.len());
    if buf[..start] != V1_PREFIX[..start] {
        return Err(malformed(&"no PROXY header"));
    }
    let line = match buf.iter().take(V1_MAX).position(|&b| b == b'\r') {
        // The `\n` after the `\r` is still to come.
        Some(cr) if cr + 1 == buf.len() => return Ok(None),
        Some(cr) => &buf[..cr + 2],
        None if buf.len() >= V1_MAX => return Err(malformed(&"longer than 107 bytes")),
        None => return Ok(None),
    };
    let h = v1::Header::try_from(line).map_err(|e| malformed(&e))?;
    let source = match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    };
    Ok(Some((source, h.header.len())))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, TransportError> {
    let h = match v2::Header::try_from(buf) {
        Ok(h) => h,
        Err(e) if e.is_incomplete() => return Ok(None),
        Err(e) => return Err(TransportError::Proxy(format!("malformed v2 header: {e}"))),
    };
    let source = match (h.command, h.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(SocketAddr::from((a.source_address, a.source_port))),
        (v2::Command::Proxy, _) => None,
    };
    Ok(Some((source, h.len())))
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

    /// A v1 header is judged once its line has ended, whatever the reads before: split right
    /// after the source port's separator or inside a UTF-8 character it used to be refused,
    /// and `PROXY UNKNOWN \n` was accepted only when nothing followed it (found by the `proxy`
    /// fuzz target).
    #[tokio::test]
    async fn v1_header_split_where_the_first_part_looks_wrong() {
        let head = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 ";
        assert!(matches!(parse(head), Ok(None)));
        let (mut a, mut b) = tokio::io::duplex(256);
        let writer = tokio::spawn(async move {
            a.write_all(head).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            a.write_all(b"1883\r\n\x10").await.unwrap();
        });
        let (src, rest) = read_header(&mut b).await.unwrap();
        assert_eq!(src, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(&rest[..], b"\x10");
        writer.await.unwrap();
        // Once the line has ended, a bad destination port is refused.
        assert!(parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 \r\n").is_err());
        assert!(parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 99999\r\n").is_err());

        assert!(matches!(parse(b"PROXY UNKNOWN caf\xc3"), Ok(None)));
        assert!(matches!(parse(b"PROXY UNKNOWN caf\xc3\xa9\r\n"), Ok(Some((None, 21)))));
        assert!(parse(b"PROXY UNKNOWN caf\xc3\r\n").is_err());
        assert!(parse(b"PROXY UNKNOWN caf\xff\r\n").is_err());

        assert!(matches!(parse(b"PROXY UNKNOWN \n"), Ok(None)));
        assert!(matches!(parse(b"PROXY UNKNOWN \nMQTT"), Ok(None)));
        assert!(parse(b"PROXY UNKNOWN \n\x9d\r\n").is_err());
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"), Ok(None)));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX").is_err());
        assert!(parse(b"PROXI").is_err());
        assert!(matches!(parse(b"PROX"), Ok(None)));
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
