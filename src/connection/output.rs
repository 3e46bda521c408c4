//! The bytes waiting to be written to one client, bounded (SPEC §8): deliveries are moved in
//! only below a high-water mark (`OUT_HIGH_WATER`, or `mqtt.max_output_buffer_bytes` if
//! lower), reading pauses at the limit, and a client that leaves its output above the
//! high-water mark for `mqtt.write_stall_timeout_secs` is disconnected. Memory follows
//! traffic: the buffer grows in steps, not by doubling, and a drained one of more than 4 KiB
//! is let go.

use bytes::{Buf, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::protocol::{self, EncodeError, Packet, Protocol};

/// Deliveries wait for room below this many bytes (or `mqtt.max_output_buffer_bytes` if lower).
pub(super) const OUT_HIGH_WATER: usize = 256 * 1024;

pub(super) struct Output {
    buf: BytesMut,
    /// Deliveries are moved in below this; reading pauses at `limit`.
    high_water: usize,
    limit: usize,
    /// Written but not yet flushed: TLS and WebSocket streams buffer inside, and only a flush
    /// pushes the rest out once the socket has room again.
    unflushed: bool,
    /// Since when the buffer has been at or above the high-water mark.
    backed_up_since: Option<Instant>,
}

impl Output {
    /// `limit`: `mqtt.max_output_buffer_bytes`.
    pub fn new(limit: usize) -> Output {
        Output {
            buf: BytesMut::new(),
            high_water: OUT_HIGH_WATER.min(limit),
            limit,
            unflushed: false,
            backed_up_since: None,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Room for deliveries.
    pub fn below_high_water(&self) -> bool {
        self.buf.len() < self.high_water
    }

    /// Room for what reading the socket may answer.
    pub fn below_limit(&self) -> bool {
        self.buf.len() < self.limit
    }

    /// Encode `p` at the end of the buffer.
    pub fn send(&mut self, p: &Packet, protocol: Protocol) -> Result<(), EncodeError> {
        let len = protocol::encoded_len(p, protocol)?;
        self.send_sized(p, len, protocol)
    }

    /// [`Output::send`] for a packet whose encoded length is known.
    pub fn send_sized(&mut self, p: &Packet, len: usize, protocol: Protocol) -> Result<(), EncodeError> {
        self.reserve(len);
        protocol::encode(p, protocol, &mut self.buf)
    }

    /// Make room for `needed` more bytes. Beyond 64 KiB the buffer grows in two steps (to the
    /// high-water mark, then to the limit, each plus 64 KiB) and compacts while copying,
    /// instead of doubling: the buffers a doubling leaves behind on the way to 1 MiB add up to
    /// as much again, and the allocator may keep them resident.
    fn reserve(&mut self, needed: usize) {
        const STEP: usize = 64 * 1024;
        let want = self.buf.len().saturating_add(needed);
        if self.buf.capacity() >= want || want <= STEP {
            return;
        }
        let target = [STEP, self.high_water + STEP, self.limit + STEP].into_iter().find(|t| *t >= want).unwrap_or(want);
        let mut bigger = BytesMut::with_capacity(target);
        bigger.extend_from_slice(&self.buf);
        self.buf = bigger;
    }

    /// Whether there is something to write or flush.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty() || self.unflushed
    }

    /// Write some of the buffer, or flush when it is empty; `Ok(n)`: bytes written (0 for a
    /// flush). Cancel-safe: bytes leave the buffer only in [`Output::written`].
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<Option<usize>> {
        if self.buf.is_empty() {
            w.flush().await.map(|()| None)
        } else {
            w.write(&self.buf).await.map(Some)
        }
    }

    /// The outcome of [`Output::write`]: `Some(n)` bytes written, `None` flushed.
    pub fn written(&mut self, n: Option<usize>) {
        match n {
            Some(n) => {
                self.buf.advance(n);
                self.unflushed = true;
            }
            None => self.unflushed = false,
        }
    }

    /// Let a drained large buffer go, and note whether the client keeps its output backed
    /// up: the time by which it must have drained it below the high-water mark.
    pub fn tick(&mut self, stall_timeout: Duration) -> Option<Instant> {
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            self.buf = BytesMut::new();
        }
        if self.below_high_water() {
            self.backed_up_since = None;
        } else if self.backed_up_since.is_none() {
            self.backed_up_since = Some(Instant::now());
        }
        self.backed_up_since.map(|t| t + stall_timeout)
    }

    /// Everything still buffered, for the last write at the end of the connection.
    pub fn take(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }
}

/// Encode and write one packet at once, bounded (answers before the connection's loop runs).
pub(super) async fn write_now<W: AsyncWrite + Unpin>(w: &mut W, p: &Packet, proto: Protocol) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    protocol::encode(p, proto, &mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(5), async {
        w.write_all(&b).await?;
        w.flush().await
    })
    .await
    .map_err(|_| std::io::Error::other("write timeout"))?
}
