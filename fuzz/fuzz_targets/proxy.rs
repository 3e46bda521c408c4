//! Fuzz target: PROXY protocol v1/v2 headers (`transport::proxy`).
//!
//! The first byte picks how the bytes arrive; the rest is what a load balancer (or anyone
//! on a trusted network) sends. Properties:
//! - the parser never panics and never claims more bytes than it was given;
//! - its answer does not depend on how the bytes were split into reads: a prefix that is
//!   complete gives the same header as the whole input, a prefix that is refused means the
//!   whole input is not accepted (it may still look incomplete: waiting is never final, the
//!   connection ends at the size limit or the handshake timeout), and once a complete
//!   header's bytes are all there it is seen;
//! - `read_header` over a stream delivered in small reads agrees with the parser and hands
//!   on exactly the bytes that follow the header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmq_gateway::fuzzing::proxy_parse;
use lmq_gateway::transport::proxy::read_header;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// A reader that hands out at most `step` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.step).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

fn check_prefix(data: &[u8], k: usize, whole: &Result<Option<(Option<std::net::SocketAddr>, usize)>, String>) {
    let part = proxy_parse(&data[..k]);
    match (&part, whole) {
        (Ok(Some(p)), _) => assert_eq!(Ok(Some(*p)), *whole, "prefix of {k} bytes complete, whole input differs"),
        (Err(e), Ok(Some(w))) => panic!("prefix of {k} bytes refused ({e}), whole input accepted: {w:?}"),
        _ => {}
    }
    if let Ok(Some((_, len))) = whole {
        if k >= *len {
            assert_eq!(part, *whole, "all {len} header bytes present in a prefix of {k} bytes, not seen");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let whole = proxy_parse(data);
    if let Ok(Some((_, len))) = &whole {
        assert!(*len > 0 && *len <= data.len(), "header of {len} bytes in {} bytes", data.len());
    }

    if data.len() <= 512 {
        for k in 0..=data.len() {
            check_prefix(data, k, &whole);
        }
    } else {
        for k in [usize::from(mode) * 8, 107, 108, 232, 256, 512, data.len()] {
            check_prefix(data, k.min(data.len()), &whole);
        }
    }

    let step = usize::from(mode % 64) + 1;
    let mut reader = Trickle { data, step };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else { return };
    let got = rt.block_on(read_header(&mut reader));
    if let Ok((source, rest)) = got {
        // read_header saw a complete header in what it read, so the whole input has it too.
        let Ok(Some((whole_source, len))) = whole else {
            panic!("read_header accepted a header the parser does not see: {whole:?}")
        };
        assert_eq!(source, whole_source);
        let after = &data[len..];
        assert!(after.starts_with(&rest), "bytes after the header altered");
        assert_eq!(rest.len() + reader.data.len(), after.len(), "bytes after the header lost");
    }
});
