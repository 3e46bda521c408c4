//! One task per client connection: CONNECT handshake, then a loop that reads and decodes
//! packets, applies them to the session, writes batched responses and deliveries, keeps
//! the keepalive, and at the end saves the session, publishes the will and writes events.
//!
//! The loop is the driver: it owns the socket, the buffers and the one timer, and selects
//! only over cancel-safe operations. Packet handling is synchronous (the `Session` state
//! machine and the checks decide at once); everything that waits runs beside the loop as a
//! future it polls — the appends (`appends`), packet handling that waits (`waiting`), catch-up
//! reads, session saves — never inside one of its branches, and every such wait is bounded.
//! Inbound QoS 1/2 is acknowledged only when the core service's append resolved (SPEC §3).
//! Decoding pauses while too many appends are outstanding (back-pressure), and reading while
//! `mqtt.max_output_buffer_bytes` wait to be written: a client that does not read is paused,
//! then disconnected after `mqtt.write_stall_timeout_secs` (SPEC §8).
//!
//! - this file: the task, the select loop, its deadlines, packet dispatch;
//! - `connect`: CONNECT → CONNACK, session restore;
//! - `inbound`: PUBLISH (checked, then stored and acknowledged beside the loop: `appends`);
//! - `subscribe`: SUBSCRIBE, UNSUBSCRIBE;
//! - `waiting`: packet handling that waits (new core topics, reads, saves), beside the loop;
//! - `outbound`: deliveries, catch-up from the core service, in-flight window;
//! - `output`: the bounded write buffer;
//! - `end`: how a connection ended; session save, will, events at the end;
//! - `tokens`: denials, `$SYS` token topics, token expiry and revocation;
//! - `offline`: LMQ's offline pull (`$SYS/getOfflineMsg`).

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::StreamExt;
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::backend::{BackendError, Fetched, StateStore, TopicPartition};
use crate::context::Context;
use crate::events::{ClientEvent, EventType};
use crate::protocol::{
    self, AckProperties, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, DisconnectProperties, LastWill,
    Packet, PacketId, Protocol, PubResponse, Publish, PublishProperties, QoS, ReasonCode, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use crate::router::mapping::{self, CoreTopic, Message, Unmapped};
use crate::router::{topic, Delivery, Reattach, SessionSlot};
use crate::session::machine::{ClientAck, Limits, Session};
use crate::session::persist::{Stored, StoredInflight};
use crate::session::registry::{Kick, Registration};
use crate::session::state::{Qos2Intent, SessionState};
use crate::transport::ConnInfo;

mod appends;
mod connect;
mod end;
mod inbound;
mod offline;
mod outbound;
mod output;
mod subscribe;
mod tokens;
mod waiting;

use appends::Appends;
use end::End;
use output::{write_now, Output};
use waiting::Waiting;

use outbound::{record_message, CatchupStep};

/// Stop taking deliveries when this many messages wait for the in-flight window.
const PENDING_HIGH_WATER: usize = 256;
/// Outstanding core-service appends per connection before decoding (and reading) pauses.
const MAX_OUTSTANDING_APPENDS: usize = 1024;
/// Records read back per catch-up fetch.
const CATCHUP_BATCH: usize = 256;
/// Read buffer for a connection that is busy; an idle one keeps only [`IDLE_READ_BUFFER`].
const BUSY_READ_BUFFER: usize = 16 * 1024;
const IDLE_READ_BUFFER: usize = 256;
/// A busy connection publishes its read positions (backlog metrics) at most this often.
const POSITIONS_EVERY: Duration = Duration::from_secs(1);

/// The deadlines of the connection's loop, behind its one timer: the keepalive (checked only
/// when it comes due, then moved to the last packet plus the keepalive), the next session
/// checkpoint, the offline pull window, the next token event and a stalled output.
struct Deadlines {
    keepalive_at: Instant,
    last_packet: Instant,
    last_persist: Instant,
    persist_at: Option<Instant>,
    pull_at: Option<Instant>,
    token_at: Option<Instant>,
    stall_at: Option<Instant>,
}

impl Deadlines {
    fn new(keep_alive: Duration) -> Deadlines {
        let now = Instant::now();
        Deadlines {
            keepalive_at: now + keep_alive.max(Duration::from_secs(1)),
            last_packet: now,
            last_persist: now,
            persist_at: None,
            pull_at: None,
            token_at: None,
            stall_at: None,
        }
    }
}

/// Memory follows traffic: a connection whose last read was small and whose buffer is drained
/// holds a few hundred bytes, a busy one room for a burst.
fn size_read_buffer(inbuf: &mut BytesMut, last_read: usize) {
    if inbuf.is_empty() && last_read < IDLE_READ_BUFFER {
        if inbuf.capacity() > IDLE_READ_BUFFER {
            *inbuf = BytesMut::with_capacity(IDLE_READ_BUFFER);
        }
    } else if inbuf.capacity() - inbuf.len() < 1024 {
        inbuf.reserve(BUSY_READ_BUFFER);
    }
}

pub use crate::now_ms;

/// Serve one client connection to the end.
/// `info` says where the client came from (after PROXY protocol and TLS, see `transport`).
pub async fn run<S>(ctx: Arc<Context>, stream: S, info: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let peer = info.peer;
    let mut counted = ctx.metrics.connection_opened(&info);
    let bytes_in = ctx.metrics.bytes_in().clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(512);
    let max_packet = ctx.limits.max_packet_size();
    let connect_timeout = Duration::from_secs(ctx.config.mqtt.connect_timeout_secs);

    // CONNECT must come first, within the timeout. Any other packet type closes the
    // connection as soon as its first byte is seen, not once its body arrived
    // [MQTT-3.1.0-1]: an unauthenticated client gets no buffering beyond one CONNECT.
    let first = Box::pin(tokio::time::timeout(connect_timeout, async {
        loop {
            if inbuf.first().is_some_and(|b| b >> 4 != protocol::CONNECT_TYPE) {
                return Err(None);
            }
            match protocol::decode(&mut inbuf, Protocol::V311, max_packet) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            match reader.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(n) => bytes_in.inc_by(n as u64),
            }
        }
    }))
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Err(Some(DecodeError::UnsupportedProtocolVersion(_)))) => {
            // Answer in 3.1.1 form, which every client version can read [MQTT-3.1.2-2].
            let ack = ConnAck { code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, ..ConnAck::default() };
            ctx.metrics.connect_result(ack.code);
            counted.reason = "connect_refused";
            let _ = Box::pin(write_now(&mut writer, &Packet::ConnAck(ack), Protocol::V311)).await;
            return;
        }
        Ok(Err(None)) if inbuf.first().is_some_and(|b| b >> 4 != protocol::CONNECT_TYPE) => {
            tracing::debug!(%peer, first_byte = inbuf.first().copied(), "first packet was not CONNECT [MQTT-3.1.0-1]");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = ?e, "connection closed before a valid CONNECT");
            return;
        }
        Ok(Ok(other)) => {
            tracing::debug!(%peer, packet = ?other.name(), "first packet was not CONNECT [MQTT-3.1.0-1]");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within {connect_timeout:?}");
            return;
        }
    };
    // Each phase's state lives on the heap only while that phase runs: an idle connection
    // then carries the state of the main loop alone (see the memory figures in
    // docs/benchmarks.md). The connection's state is boxed too: held in this future, it
    // would widen every one of its states (the CONNECT read's, the refusal write's) to its
    // size.
    let mut conn = match Box::pin(Conn::accept(ctx.clone(), *connect, info, conn_id, &mut writer)).await {
        Some(c) => Box::new(c),
        None => {
            counted.reason = "connect_refused";
            return;
        }
    };
    let end = Box::pin(conn.serve(&mut reader, &mut writer, inbuf)).await;
    counted.reason = end.metric_reason();
    Box::pin(conn.finish(end, &mut writer)).await;
}

struct Conn {
    ctx: Arc<Context>,
    protocol: Protocol,
    client_id: String,
    username: Option<String>,
    /// Client address (real one behind a PROXY-protocol load balancer), listener, transport,
    /// client-certificate CN.
    info: ConnInfo,
    /// Who the client is and what it may do.
    identity: crate::auth::Identity,
    /// Revocations of tokens and credentials (token and device-credential clients only).
    revocations: Option<tokio::sync::broadcast::Receiver<crate::auth::Revocation>>,
    /// Token ids whose `$SYS/tokenExpireNotice` was sent.
    expiry_notified: Vec<String>,
    channel_id: String,
    keep_alive: Duration,
    /// The session's state machine: subscriptions, positions, the queue, the in-flight
    /// window (the client's Receive Maximum, capped by config) and topic aliases.
    session: Session,
    slot: Arc<SessionSlot>,
    rx: crate::router::queue::Receiver,
    registration: Registration,
    /// Bytes waiting to be written to the client (bounded: `output`).
    out: Output,
    /// A stored session exists for this ClientId (so a clean end must delete it).
    stored: bool,
    /// Resolves once the last status event is written (events are chained to keep their order).
    last_event: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The session save in flight (persistent sessions).
    persist: Option<BoxFuture<'static, Result<(), BackendError>>>,
    /// This connection's share of the in-flight / queued / subscription gauges.
    gauges: crate::metrics::GaugeShare,
    /// When the read positions may next be published (`session::backlog`), and whether a loop
    /// turn since the last publication may have changed them.
    positions_at: Instant,
    positions_stale: bool,
    /// Offline pull: whether the restored backlog is pushed, held, or pulled on request.
    offline: offline::OfflinePull,
    /// Packet handling waiting beside the loop; no further packet is decoded meanwhile.
    waiting: Waiting,
}

impl Conn {
    /// The main loop, then completion of the appends still outstanding: a message the
    /// client handed over (QoS 0 included) is stored even if the client left right after.
    async fn serve<R, W>(&mut self, reader: &mut R, writer: &mut W, inbuf: BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let backend_timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let mut appends = Appends::new(self.ctx.clone(), backend_timeout);
        let end = self.serve_loop(reader, writer, inbuf, &mut appends).await;
        // Each wait carries its own timeout, so this ends. A connection taken over (or shut
        // down) does not make its successor wait for PUBLISHes that have no place in the log
        // yet: none of them was acknowledged, so the client sends them again.
        if matches!(end, End::Kicked(_)) {
            appends.placing.clear();
        }
        while appends.placing.busy() {
            let placed = appends.placing.placed().await;
            let _ = self.on_placed(placed, &mut appends);
        }
        while let Some(r) = appends.acks.next().await {
            let _ = self.on_ack(r);
        }
        end
    }

    async fn serve_loop<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        mut inbuf: BytesMut,
        appends: &mut Appends,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut catchup: Option<BoxFuture<'static, CatchupStep>> = None;
        // One timer for every deadline of the loop (`Deadlines`), re-armed only when the
        // earliest of them moves: an idle connection costs no wake-ups, a busy one no timer
        // churn, and the loop's state holds one timer, not six.
        let mut deadlines = Deadlines::new(self.keep_alive);
        let timer = tokio::time::sleep_until(deadlines.keepalive_at);
        tokio::pin!(timer);
        let max_packet = self.ctx.limits.max_packet_size();
        // The kick receiver moves out of `self` so the loop can borrow `self` freely.
        let (_unused, placeholder) = tokio::sync::oneshot::channel();
        let mut kicked = std::mem::replace(&mut self.registration.kicked, placeholder);
        let shutdown = self.ctx.shutdown.clone();

        let mut last_read = 0usize;
        let (bytes_in, bytes_out) = (self.ctx.metrics.bytes_in().clone(), self.ctx.metrics.bytes_out().clone());
        loop {
            // Packets take effect in order, each at once or beside the loop (`waiting`); the
            // bytes after a packet that waits, or past the outstanding appends' bound, stay in
            // the buffer until then (those that came with CONNECT included).
            if let Err(end) = self.decode_all(&mut inbuf, max_packet, appends) {
                return end;
            }
            self.flush_pending();
            self.report_gauges();
            self.report_positions();
            size_read_buffer(&mut inbuf, last_read);
            let waiting = self.waiting.busy();
            let deadline = self.deadlines(&mut deadlines);
            if let Some(at) = deadline {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            let can_read = !waiting && appends.outstanding() < MAX_OUTSTANDING_APPENDS && self.out.below_limit();
            let can_take = !self.waiting.holds_deliveries()
                && self.session.queued() < PENDING_HIGH_WATER
                && self.out.below_high_water();
            if catchup.is_none() && can_take && !self.offline.holds_catchup() {
                if let Some((tp, lag)) = self.slot.lagging().into_iter().next() {
                    let from = self.session.state.cursors.get(&tp).map(|c| c.read_from(lag)).unwrap_or(lag);
                    catchup = Some(self.fetch_step(tp, from));
                }
            }
            tokio::select! {
                k = &mut kicked => {
                    return End::Kicked(k.unwrap_or(Kick::Administrative));
                }
                _ = shutdown.cancelled() => return End::Kicked(Kick::Shutdown),
                n = self.out.write(writer), if self.out.pending() => {
                    match n {
                        Ok(Some(0)) | Err(_) => return End::Dropped("write failed"),
                        Ok(n) => {
                            bytes_out.inc_by(n.unwrap_or(0) as u64);
                            self.out.written(n);
                        }
                    }
                }
                placed = appends.placing.placed(), if appends.placing.busy() => {
                    if let Err(end) = self.on_placed(placed, appends).and_then(|()| self.take_placed(appends)) {
                        return end;
                    }
                }
                resume = self.waiting.done(), if waiting => {
                    if let Err(end) = self.on_resume(resume, appends) { return end; }
                }
                Some(r) = appends.acks.next(), if !appends.acks.is_empty() => {
                    if let Err(end) = self.on_ack(r) { return end; }
                    // Coalesce: take every acknowledgement that is already complete.
                    while let Some(Some(r)) = appends.acks.next().now_or_never() {
                        if let Err(end) = self.on_ack(r) { return end; }
                    }
                }
                read = reader.read_buf(&mut inbuf), if can_read => {
                    match read {
                        Ok(0) => return End::Dropped("connection closed by peer"),
                        Err(_) => return End::Dropped("read error"),
                        Ok(n) => {
                            bytes_in.inc_by(n as u64);
                            last_read = n;
                            deadlines.last_packet = Instant::now();
                        }
                    }
                }
                d = self.rx.recv(), if can_take => {
                    self.on_delivery(d);
                    let mut n = 0;
                    while n < 256 && self.session.queued() < PENDING_HIGH_WATER {
                        match self.rx.try_recv() {
                            Some(d) => self.on_delivery(d),
                            None => break,
                        }
                        n += 1;
                    }
                }
                step = async { match catchup.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if catchup.is_some() && can_take => {
                    catchup = self.on_catchup(step);
                }
                _ = self.slot.lag_notify.notified(), if catchup.is_none() => {}
                res = async { match self.persist.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if self.persist.is_some() => {
                    self.persist = None;
                    self.on_persisted(res);
                }
                r = async { match self.revocations.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } }, if self.revocations.is_some() && !waiting => {
                    if let Err(end) = self.on_revocation(r, appends) { return end; }
                }
                _ = &mut timer, if deadline.is_some() => {
                    if let Err(end) = self.on_deadline(&mut deadlines, waiting) { return end; }
                }
            }
        }
    }

    /// This turn's deadlines (see [`Deadlines`]); the earliest of them.
    fn deadlines(&mut self, d: &mut Deadlines) -> Option<Instant> {
        let mqtt = &self.ctx.config.mqtt;
        let waiting = self.waiting.busy();
        // While packet handling waits, no save starts and no token event is handled (`waiting`).
        d.persist_at = if self.persist.is_none() && !waiting {
            self.session.save_due(d.last_persist, Duration::from_millis(mqtt.session_checkpoint_ms))
        } else {
            None
        };
        d.token_at = if waiting { None } else { self.next_token_event().map(tokens::instant_at) };
        d.pull_at = self.offline.deadline();
        d.stall_at = self.out.tick(Duration::from_secs(mqtt.write_stall_timeout_secs));
        [
            (!self.keep_alive.is_zero()).then_some(d.keepalive_at),
            d.persist_at,
            // Positions changed within a second of the last publication: published once more.
            self.positions_stale.then_some(self.positions_at),
            d.pull_at,
            d.token_at,
            d.stall_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The timer fired: handle whatever came due.
    fn on_deadline(&mut self, d: &mut Deadlines, waiting: bool) -> Result<(), End> {
        let now = Instant::now();
        if !self.keep_alive.is_zero() && now >= d.keepalive_at {
            let due = d.last_packet + self.keep_alive;
            // While a packet's handling waits, the client's next packets wait unread.
            if now >= due && !waiting {
                return Err(End::Server(ReasonCode::KEEP_ALIVE_TIMEOUT, "keepalive timeout"));
            }
            d.keepalive_at = due.max(now + Duration::from_secs(1));
        }
        if d.stall_at.is_some_and(|t| now >= t) {
            self.ctx.limits.count(crate::labels::Refusal::SlowReader);
            tracing::debug!(client_id = %self.client_id, waiting = self.out.len(), "client does not read; disconnecting");
            return Err(End::SlowReader);
        }
        if d.persist_at.is_some_and(|t| now >= t) {
            self.session.saving();
            d.last_persist = now;
            self.advance_idle_cursors();
            let stored = Stored::from_state(&self.session.state, self.session.expiry, None);
            self.persist = Some(self.save_session(Some(stored)));
            self.stored = true;
        }
        // No offline pull request in time: the held backlog is pushed.
        if d.pull_at.is_some_and(|t| now >= t) {
            self.offline.push();
        }
        if d.token_at.is_some_and(|t| now >= t) {
            self.on_token_event()?;
        }
        Ok(())
    }

    /// Decode and handle the buffered packets, until one waits beside the loop or the
    /// outstanding appends reach their bound (the rest stays buffered, unread further).
    fn decode_all(&mut self, inbuf: &mut BytesMut, max_packet: usize, appends: &mut Appends) -> Result<(), End> {
        while !inbuf.is_empty() && !self.waiting.busy() && appends.outstanding() < MAX_OUTSTANDING_APPENDS {
            match protocol::decode(inbuf, self.protocol, max_packet) {
                Ok(Some(p)) => self.on_packet(p, appends)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    if matches!(e, DecodeError::PacketTooLarge { .. }) {
                        // Refused from the fixed header: counted with the payload limit.
                        let _ = self.ctx.limits.check_payload(usize::MAX);
                    }
                    tracing::debug!(client_id = %self.client_id, error = %e, "malformed packet");
                    return Err(End::Server(e.reason_code(), "malformed packet"));
                }
            }
        }
        Ok(())
    }

    fn on_packet(&mut self, packet: Packet, appends: &mut Appends) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, appends),
            Packet::PubAck(r) => self.on_client_ack(ClientAck::PubAck(r)),
            Packet::PubRec(r) => self.on_client_ack(ClientAck::PubRec(r)),
            Packet::PubComp(r) => self.on_client_ack(ClientAck::PubComp(r)),
            Packet::PubRel(r) => self.on_client_ack(ClientAck::PubRel(r)),
            Packet::Subscribe(s) => self.on_subscribe(s, appends),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                let max = self.ctx.config.mqtt.session_expiry_max_secs;
                self.session
                    .on_disconnect_expiry(d.properties.session_expiry_interval, max)
                    .map_err(|v| End::Server(v.code, v.why))?;
                Err(End::ClientDisconnect { with_will: d.code == ReasonCode::DISCONNECT_WITH_WILL })
            }
            Packet::Connect(_) => Err(End::Server(ReasonCode::PROTOCOL_ERROR, "second CONNECT [MQTT-3.1.0-2]")),
            Packet::Auth(_) => {
                Err(End::Server(ReasonCode::BAD_AUTHENTICATION_METHOD, "AUTH without an authentication method"))
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(End::Server(ReasonCode::PROTOCOL_ERROR, "server-to-client packet sent by a client"))
            }
        }
    }

    /// Apply the client's acknowledgement to the session (`session::machine`), then do what it
    /// says: trace, bound the acknowledgements kept above an unacknowledged message, answer.
    fn on_client_ack(&mut self, ack: ClientAck) -> Result<(), End> {
        let step = self.session.on_client_ack(ack);
        if let Some((message, how)) = &step.acked {
            self.trace(crate::trace::Kind::Acked, message, || how.to_string());
        }
        self.check_acked_above(step.acked_above)?;
        if let Some(reply) = &step.reply {
            self.send(reply);
        }
        Ok(())
    }

    /// A session save finished: the PUBRECs that waited for it go out, or wait for the next.
    fn on_persisted(&mut self, res: Result<(), BackendError>) {
        if let Err(e) = &res {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot save session");
        }
        for pubrec in self.session.on_saved(res.is_ok()) {
            self.send(&pubrec);
        }
    }

    /// Write the session (`None`: delete it) to the sessions store.
    pub(super) fn save_session(&self, stored: Option<Stored>) -> BoxFuture<'static, Result<(), BackendError>> {
        self.ctx.metrics.session_saves.inc();
        self.ctx.backend.put_state(StateStore::Sessions, &self.client_id, stored.map(|s| s.encode()))
    }

    /// Finish the session save in flight, if any (a save made now must land after it).
    pub(super) async fn finish_persist(&mut self) {
        // A step that saves the session (a QoS 2 intent) lands first too; what it would have
        // done next no longer matters.
        if self.waiting.saves() {
            let _ = self.waiting.done().await;
        }
        if let Some(f) = self.persist.take() {
            let res = f.await;
            self.on_persisted(res);
        }
    }

    /// A client that keeps one message unacknowledged while acknowledging the ones after it
    /// makes the session remember each of those acknowledgements: bounded, then disconnected
    /// (it gets the unacknowledged messages again when it returns).
    fn check_acked_above(&self, above: usize) -> Result<(), End> {
        if above > self.ctx.config.mqtt.max_acked_above {
            let r = self.ctx.limits.count(crate::labels::Refusal::AckedAboveLimit);
            return Err(End::Server(r.reason_code(), "too many acknowledgements above an unacknowledged message"));
        }
        Ok(())
    }

    /// Bring this connection's share of the in-flight / queued / subscription gauges up to date.
    fn report_gauges(&mut self) {
        let now = [self.session.state.outbound.len(), self.session.queued(), self.session.state.subscriptions.len()];
        self.gauges.report(&self.ctx.metrics, now);
    }

    /// Publish the read positions for the backlog metrics: at most once per
    /// [`POSITIONS_EVERY`], and once more after the last loop turn that came too early.
    fn report_positions(&mut self) {
        let now = Instant::now();
        if now < self.positions_at {
            self.positions_stale = true;
            return;
        }
        self.positions_at = now + POSITIONS_EVERY;
        self.positions_stale = false;
        let lagging: Vec<TopicPartition> = self.slot.lagging().into_iter().map(|(tp, _)| tp).collect();
        let view = crate::session::backlog::SessionView::live(&self.session.state, &lagging, self.rx.is_empty());
        self.registration.live.set(view);
    }

    fn send(&mut self, p: &Packet) {
        if let Err(e) = self.out.send(p, self.protocol) {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot encode packet");
        }
    }
}
