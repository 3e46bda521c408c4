//! Fuzz target: the WebSocket transport (`transport::ws`): the HTTP request head, the
//! upgrade, then frames (fragmented, masked or not, control frames, close, oversized ones),
//! driven through the real `accept` and `WsStream` over an in-memory pipe with a small
//! maximum packet size.
//!
//! Input: a flags byte, then the bytes the client sends. Flags:
//! - bit 0: send a valid upgrade request first (the rest is then frames);
//! - bit 1: the client reads what the gateway writes (otherwise it never does);
//! - bit 2: the gateway echoes what it reads (as the connection answers packets);
//! - bit 3: repeat the client's bytes up to [`REPEAT_TO`] (a long stream from a short input);
//! - bits 4..=6: the client writes in pieces of 2^n bytes;
//! - bit 7: the client sends everything at once; otherwise it sends the request head (up to
//!   the first empty line) and waits for the answer before sending more, as RFC 6455 4.1
//!   asks (bytes after the head, before the answer, are refused as junk).
//!
//! Properties: nothing panics; a read yields at most one message, of at most the maximum
//! packet size; what reads yield is never more than the client sent; and the heap the
//! exchange holds at any time stays under [`HEAP_BOUND`], however much the client sends and
//! whether or not it reads (the transport must not buffer in proportion to its input).
//! A stalled exchange ends as soon as nothing can move: the runtime's clock is paused, so
//! the time limit passes at once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmq_gateway::transport::ws::{accept, WsSettings};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The largest MQTT packet, and so the largest WebSocket message.
const MAX_MESSAGE: usize = 512;
/// Bytes the in-memory pipe holds in each direction (a socket's buffers).
const PIPE: usize = 1024;
const REPEAT_TO: usize = 512 * 1024;
/// What one connection may hold, measured at about 20 KiB for ordinary exchanges and 160 KiB
/// for a ping flood that is never read: the request head (8 KiB, in a buffer that may
/// double), tungstenite's read buffer (8 KiB) and one frame, one message being assembled
/// and one handed out, the write buffer (65 KiB of frames, in a vector whose capacity may
/// double), the pipe, and bookkeeping. [`REPEAT_TO`] is well above it: holding anything in
/// proportion to the input fails.
const HEAP_BOUND: usize = 224 * 1024;

const UPGRADE: &[u8] = b"GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Flags {
    client_reads: bool,
    echo: bool,
    piece: usize,
    pipeline: bool,
}

/// The gateway's side: upgrade, then read (and echo) until the stream ends. Returns the
/// bytes read.
async fn gateway(io: DuplexStream, echo: bool) -> usize {
    let settings = WsSettings { path: "/mqtt".into(), allowed_origins: Vec::new(), max_message: MAX_MESSAGE };
    let Ok(mut ws) = accept(Box::new(io), &settings).await else { return 0 };
    let mut buf = vec![0u8; 4 * MAX_MESSAGE];
    let mut total = 0;
    loop {
        match ws.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                assert!(n <= MAX_MESSAGE, "one read gave {n} bytes, more than one message of at most {MAX_MESSAGE}");
                total += n;
                if echo && (ws.write_all(&buf[..n]).await.is_err() || ws.flush().await.is_err()) {
                    break;
                }
            }
        }
    }
    let _ = ws.shutdown().await;
    total
}

async fn send<W: AsyncWriteExt + Unpin>(tx: &mut W, bytes: &[u8], piece: usize) -> bool {
    for piece in bytes.chunks(piece) {
        if tx.write_all(piece).await.is_err() {
            return false;
        }
    }
    true
}

/// The client's side: send everything in pieces, reading the answers or not.
async fn client(io: DuplexStream, input: &[u8], flags: &Flags) {
    let (mut rx, mut tx) = tokio::io::split(io);
    let head_len = match flags.pipeline {
        true => 0,
        false => input.windows(4).position(|w| w == b"\r\n\r\n").map_or(input.len(), |i| i + 4),
    };
    let (head, body) = input.split_at(head_len);
    if !head.is_empty() {
        if !send(&mut tx, head, flags.piece).await {
            return;
        }
        // The answer's head, however it ends.
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") && answer.len() < 16 * 1024 {
            match rx.read(&mut byte).await {
                Ok(1) => answer.push(byte[0]),
                _ => break,
            }
        }
    }
    let send = async {
        if send(&mut tx, body, flags.piece).await {
            let _ = tx.shutdown().await;
        }
    };
    let receive = async {
        if flags.client_reads {
            let mut sink = [0u8; 4096];
            while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::join!(send, receive);
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&bits, rest)) = data.split_first() else { return };
    let flags = Flags {
        client_reads: bits & 2 != 0,
        echo: bits & 4 != 0,
        piece: 1 << ((bits >> 4) & 7),
        pipeline: bits & 0x80 != 0,
    };
    let mut input = Vec::with_capacity(UPGRADE.len() + REPEAT_TO + rest.len());
    if bits & 1 != 0 {
        input.extend_from_slice(UPGRADE);
    }
    input.extend_from_slice(rest);
    if bits & 8 != 0 && !rest.is_empty() {
        while input.len() < REPEAT_TO {
            input.extend_from_slice(rest);
        }
    }

    RUNTIME.with(|rt| {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let read = rt.block_on(async {
            let (near, far) = tokio::io::duplex(PIPE);
            let gateway = gateway(far, flags.echo);
            tokio::pin!(gateway);
            let exchange = async {
                tokio::select! {
                    read = &mut gateway => read,
                    // The client is done (it does not wait for a gateway that no longer reads).
                    () = client(near, &input, &flags) => (&mut gateway).await,
                }
            };
            tokio::time::timeout(Duration::from_secs(60), exchange).await.unwrap_or(0)
        });
        let held = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        assert!(held <= HEAP_BOUND, "the exchange held {held} bytes of heap (bound {HEAP_BOUND})");
        assert!(read <= input.len(), "read {read} bytes of payload from {} bytes sent", input.len());
    });
});
