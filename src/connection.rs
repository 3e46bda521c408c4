//! One task per client connection: CONNECT handshake, then a loop that reads and decodes
//! packets, applies them to the session, writes batched responses and deliveries, keeps
//! the keepalive, and at the end saves the session, publishes the will and writes events.
//!
//! Every wait a client or the core service can stall is bounded: CONNECT timeout,
//! keepalive, core-service acknowledgement timeout, final flush. Inbound QoS 1/2 is
//! acknowledged only when the core service's append future resolved (SPEC §3).
//! Reading the socket pauses while too many appends are outstanding (back-pressure).

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::backend::{BackendError, Fetched, StateStore, TopicPartition};
use crate::events::{ClientEvent, EventType};
use crate::protocol::{
    self, AckProperties, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, DisconnectProperties, LastWill,
    Packet, PacketId, Protocol, PubResponse, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck,
    Subscribe, UnsubAck, Unsubscribe,
};
use crate::router::mapping::{self, Message};
use crate::router::{topic, Delivery, Reattach, SessionSlot};
use crate::server::Context;
use crate::session::persist::{Stored, StoredInflight};
use crate::session::registry::{Kick, Registration};
use crate::session::state::{Origin, Outbound, OutboundStage, Pending, SessionState, Subscription};
use crate::transport::ConnInfo;

/// Stop taking deliveries when this many bytes wait to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Stop taking deliveries when this many messages wait for the in-flight window.
const PENDING_HIGH_WATER: usize = 256;
/// Outstanding core-service appends per connection before reading pauses.
const MAX_OUTSTANDING_APPENDS: usize = 1024;
/// Records read back per catch-up fetch.
const CATCHUP_BATCH: usize = 256;
/// Read buffer for a connection that is busy; an idle one keeps only [`IDLE_READ_BUFFER`].
const BUSY_READ_BUFFER: usize = 16 * 1024;
const IDLE_READ_BUFFER: usize = 256;
/// How often a dirty persistent session is saved.
const PERSIST_EVERY: Duration = Duration::from_millis(100);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Serve one client connection to the end.
/// `info` says where the client came from (after PROXY protocol and TLS, see `transport`).
pub async fn run<S>(ctx: Arc<Context>, stream: S, info: ConnInfo)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let peer = info.peer;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(512);
    let max_packet = ctx.limits.max_packet_size();
    let connect_timeout = Duration::from_secs(ctx.config.mqtt.connect_timeout_secs);

    // CONNECT must come first, within the timeout.
    let first = tokio::time::timeout(connect_timeout, async {
        loop {
            match protocol::decode(&mut inbuf, Protocol::V311, max_packet) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            match reader.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    })
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(c))) => *c,
        Ok(Err(Some(DecodeError::UnsupportedProtocolVersion(_)))) => {
            // Answer in 3.1.1 form, which every client version can read [MQTT-3.1.2-2].
            let ack = ConnAck { code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, ..ConnAck::default() };
            let _ = write_now(&mut writer, &Packet::ConnAck(ack), Protocol::V311).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = ?e, "connection closed before a valid CONNECT");
            return;
        }
        Ok(Ok(other)) => {
            tracing::debug!(%peer, packet = ?packet_name(&other), "first packet was not CONNECT [MQTT-3.1.0-1]");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within {connect_timeout:?}");
            return;
        }
    };
    let mut conn = match Conn::accept(ctx.clone(), connect, info, conn_id, &mut writer).await {
        Some(c) => c,
        None => return,
    };
    let end = conn.serve(&mut reader, &mut writer, inbuf).await;
    conn.finish(end, &mut writer).await;
}

/// Write some of `out`, or flush when it is empty: `Some(n)` written, `None` flushed.
async fn write_or_flush<W: AsyncWrite + Unpin>(w: &mut W, out: &[u8]) -> std::io::Result<Option<usize>> {
    if out.is_empty() {
        w.flush().await.map(|()| None)
    } else {
        w.write(out).await.map(Some)
    }
}

async fn write_now<W: AsyncWrite + Unpin>(w: &mut W, p: &Packet, proto: Protocol) -> std::io::Result<()> {
    let mut b = BytesMut::new();
    protocol::encode(p, proto, &mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(5), async {
        w.write_all(&b).await?;
        w.flush().await
    })
    .await
    .map_err(|_| std::io::Error::other("write timeout"))?
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

/// How a connection ended.
#[derive(Debug, Clone)]
enum End {
    /// DISCONNECT from the client; `with_will` for MQTT 5 reason 0x04.
    ClientDisconnect {
        with_will: bool,
    },
    /// Socket closed or failed without DISCONNECT.
    Dropped(&'static str),
    /// We close it; MQTT 5 clients get a DISCONNECT with this reason first.
    Server(ReasonCode, &'static str),
    Kicked(Kick),
}

/// Result of one core-service append, in publish order.
struct AckResult {
    packet_id: Option<PacketId>,
    qos: QoS,
    outcome: Result<(), String>,
}

enum CatchupStep {
    Fetched(TopicPartition, Result<Fetched, BackendError>),
    Reattached(TopicPartition, u64, Result<Reattach, crate::router::RouterError>),
    Retry(TopicPartition, u64),
}

struct Conn {
    ctx: Arc<Context>,
    protocol: Protocol,
    client_id: String,
    username: Option<String>,
    /// Client address (real one behind a PROXY-protocol load balancer), listener, transport,
    /// client-certificate CN.
    info: ConnInfo,
    channel_id: String,
    keep_alive: Duration,
    session_expiry: u32,
    /// Expiry given at CONNECT was 0: DISCONNECT may not raise it [MQTT-3.14.2-2].
    expiry_was_zero: bool,
    will: Option<LastWill>,
    state: SessionState,
    slot: Arc<SessionSlot>,
    rx: tokio::sync::mpsc::Receiver<Delivery>,
    registration: Registration,
    /// Our window towards the client: its Receive Maximum, capped by config.
    window: usize,
    /// Client's Maximum Packet Size (MQTT 5).
    client_max_packet: Option<usize>,
    topic_aliases: HashMap<u16, String>,
    pending: VecDeque<Pending>,
    out: BytesMut,
    dirty: bool,
    /// A stored session exists for this ClientId (so a clean end must delete it).
    stored: bool,
    /// The last status event being written (events are chained to keep their order).
    last_event: Option<tokio::task::JoinHandle<()>>,
    inbound_inflight: usize,
}

impl Conn {
    /// Validate CONNECT, take over an existing session, restore state, send CONNACK.
    async fn accept<W: AsyncWrite + Unpin>(
        ctx: Arc<Context>,
        connect: Connect,
        info: ConnInfo,
        conn_id: u64,
        writer: &mut W,
    ) -> Option<Conn> {
        let protocol = connect.protocol;
        let refuse = |code: ReasonCode| Packet::ConnAck(ConnAck { code, ..ConnAck::default() });
        let mqtt = &ctx.config.mqtt;

        // ClientId: assign one when empty and allowed [MQTT-3.1.3-6/7/8].
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !connect.clean_start && protocol != Protocol::V5 {
                let _ = write_now(writer, &refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID), protocol).await;
                return None;
            }
            let id = format!("auto-{}-{conn_id}", ctx.gateway_id);
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        if ctx.limits.check_client_id(&client_id).is_err() || client_id.starts_with('$') {
            let _ = write_now(writer, &refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID), protocol).await;
            return None;
        }
        if let Some(w) = &connect.will {
            if topic::validate_name(&w.topic).is_err() || ctx.limits.check_topic(&w.topic).is_err() {
                let _ = write_now(writer, &refuse(ReasonCode::TOPIC_NAME_INVALID), protocol).await;
                return None;
            }
        }

        // Keepalive: MQTT 5 clients asking for none or too long get Server Keep Alive.
        let mut server_keep_alive = None;
        let ka =
            if protocol == Protocol::V5 && (connect.keep_alive == 0 || connect.keep_alive > mqtt.keepalive_max_secs) {
                server_keep_alive = Some(mqtt.keepalive_max_secs);
                mqtt.keepalive_max_secs
            } else {
                connect.keep_alive.min(mqtt.keepalive_max_secs.max(1))
            };
        let requested_expiry = match protocol {
            Protocol::V5 => connect.properties.session_expiry_interval.unwrap_or(0),
            _ if connect.clean_start => 0,
            _ => u32::MAX,
        };
        let session_expiry = requested_expiry.min(mqtt.session_expiry_max_secs);

        // Takeover: the old connection saves its session before we load it.
        let new_clean_start = connect.clean_start;
        let registration =
            ctx.registry.take(&client_id, conn_id, Kick::TakenOver { new_clean_start }, Duration::from_secs(10)).await;

        // Session: load the stored one unless clean start.
        let backend = &ctx.backend;
        let existing = match tokio::time::timeout(
            Duration::from_secs(mqtt.backend_timeout_secs),
            backend.get_state(StateStore::Sessions, &client_id),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(client_id, error = %e, "cannot load session");
                let _ = write_now(writer, &refuse(ReasonCode::SERVER_UNAVAILABLE), protocol).await;
                ctx.registry.release(&client_id, conn_id);
                return None;
            }
            Err(_) => {
                let _ = write_now(writer, &refuse(ReasonCode::SERVER_UNAVAILABLE), protocol).await;
                ctx.registry.release(&client_id, conn_id);
                return None;
            }
        };
        let had_stored = existing.is_some();
        let stored = if connect.clean_start {
            // A clean start discards any stored session [MQTT-3.1.2-4].
            if had_stored {
                let _ = backend.put_state(StateStore::Sessions, &client_id, None).await;
            }
            None
        } else {
            existing.and_then(|b| Stored::decode(&b)).filter(|s| !s.expired(now_ms()))
        };
        let session_present = stored.is_some();
        let (state, inflight) = match stored {
            Some(s) => s.into_state(),
            None => (SessionState::new(client_id.clone()), Vec::new()),
        };

        let (slot, rx) = ctx.router.register(client_id.clone().into(), mqtt.queue_capacity);
        let window = match protocol {
            Protocol::V5 => usize::from(connect.properties.receive_maximum.unwrap_or(u16::MAX).min(mqtt.max_inflight)),
            _ => usize::from(mqtt.max_inflight),
        };
        let mut conn = Conn {
            protocol,
            client_id: client_id.clone(),
            username: connect.username.clone(),
            info,
            channel_id: format!("{}-{conn_id}", ctx.gateway_id),
            keep_alive: Duration::from_millis(u64::from(ka) * 1500),
            session_expiry,
            expiry_was_zero: session_expiry == 0,
            will: connect.will.clone(),
            state,
            slot,
            rx,
            registration,
            window: window.max(1),
            client_max_packet: connect.properties.maximum_packet_size.map(|v| v as usize),
            topic_aliases: HashMap::new(),
            pending: VecDeque::new(),
            out: BytesMut::new(),
            dirty: false,
            stored: session_present,
            last_event: None,
            inbound_inflight: 0,
            ctx: ctx.clone(),
        };

        // Re-register restored subscriptions with the router and catch up from stored positions.
        if let Err(code) = conn.restore(inflight).await {
            let _ = write_now(writer, &refuse(code), protocol).await;
            conn.ctx.router.unregister(&conn.slot, &[]);
            conn.ctx.registry.release(&client_id, conn_id);
            return None;
        }

        if session_expiry > 0 {
            // Offline P2P messages: a persistent session reads every known core topic.
            let router = conn.ctx.router.clone();
            for (tp, live) in router.positions(&router.assigned_topics()) {
                conn.state.cursor(&tp, live);
            }
        }

        let mut props = ConnAckProperties::default();
        if protocol == Protocol::V5 {
            props.receive_maximum = Some(mqtt.receive_maximum);
            props.maximum_packet_size = u32::try_from(ctx.limits.max_packet_size()).ok();
            props.topic_alias_maximum = Some(mqtt.topic_alias_max);
            props.retain_available = (!mqtt.retain_available).then_some(0);
            props.assigned_client_identifier = assigned;
            props.server_keep_alive = server_keep_alive;
            if requested_expiry != session_expiry {
                props.session_expiry_interval = Some(session_expiry);
            }
        }
        let ack = Packet::ConnAck(ConnAck { session_present, code: ReasonCode::SUCCESS, properties: props });
        conn.emit(EventType::Connect, None);
        if protocol::encode(&ack, protocol, &mut conn.out).is_err() {
            return None;
        }
        // Re-sent in-flight messages go out right after CONNACK.
        conn.resend_inflight();
        if session_expiry > 0 {
            conn.dirty = true;
        }
        let info = &conn.info;
        tracing::debug!(
            client_id,
            peer = %info.peer,
            listener = %info.listener,
            transport = info.transport.as_str(),
            tls_cn = ?info.tls_cn,
            ?protocol,
            session_present,
            "client connected"
        );
        Some(conn)
    }

    /// Subscriptions and positions of a restored session go back to the router.
    async fn restore(&mut self, inflight: Vec<StoredInflight>) -> Result<(), ReasonCode> {
        let router = self.ctx.router.clone();
        let filters: Vec<(String, QoS)> =
            self.state.subscriptions.iter().map(|s| (s.filter.clone(), s.options.qos)).collect();
        for (filter, qos) in filters {
            let positions =
                router.subscribe(&self.slot, &filter, qos).await.map_err(|_| ReasonCode::SERVER_UNAVAILABLE)?;
            for (tp, live) in positions {
                self.state.cursor(&tp, live);
            }
        }
        // In-flight messages: fetch their bodies back from the log.
        for inf in inflight {
            let Some(pid) = inf.packet_id() else { continue };
            let origin = inf.origin();
            let qos = QoS::from_u8(inf.qos).unwrap_or(QoS::AtLeastOnce);
            let message = if inf.released {
                None
            } else {
                let fetched = self
                    .ctx
                    .backend
                    .fetch(&origin.tp, origin.offset, 1)
                    .await
                    .map_err(|_| ReasonCode::SERVER_UNAVAILABLE)?;
                fetched
                    .records
                    .into_iter()
                    .find(|r| r.offset == origin.offset)
                    .and_then(|r| record_message(&self.ctx, &r.tp, &r.record))
            };
            if !inf.released && message.is_none() {
                continue; // gone by retention
            }
            let stage = if inf.released { OutboundStage::Released } else { OutboundStage::Published };
            let message = message.unwrap_or_else(|| Arc::new(empty_message()));
            self.state.cursor(&origin.tp, origin.offset).pending.insert(origin.offset);
            self.state.outbound.insert(
                pid,
                Outbound { message, qos, retain: false, subscription_ids: Vec::new(), origin: Some(origin), stage },
            );
        }
        // Every cursor reads back what the session missed while away.
        let cursors: Vec<(TopicPartition, u64)> =
            self.state.cursors.iter().map(|(tp, c)| (tp.clone(), c.committed())).collect();
        for (tp, from) in cursors {
            self.slot.mark_lagging(tp, from);
        }
        Ok(())
    }

    fn resend_inflight(&mut self) {
        let mut ids: Vec<PacketId> = self.state.outbound.keys().copied().collect();
        ids.sort();
        for pid in ids {
            let Some(o) = self.state.outbound.get(&pid) else { continue };
            let packet = match o.stage {
                OutboundStage::Released => Packet::PubRel(PubResponse::new(pid)),
                OutboundStage::Published => Packet::Publish(publish_packet(o, Some(pid), true, self.protocol)),
            };
            let _ = protocol::encode(&packet, self.protocol, &mut self.out);
        }
    }

    /// Write a status event. Events of one connection are written in order: each waits for
    /// the previous one, without holding up the connection.
    fn emit(&mut self, event_type: EventType, reason: Option<String>) {
        let ev = ClientEvent {
            event_type,
            client_id: self.client_id.clone(),
            channel_id: self.channel_id.clone(),
            client_ip: self.info.peer.ip().to_string(),
            time: now_ms(),
            gateway_id: self.ctx.gateway_id.clone(),
            username: self.username.clone(),
            reason,
        };
        let backend = self.ctx.backend.clone();
        let previous = self.last_event.take();
        self.last_event = Some(tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            if let Err(e) = backend.emit_event(ev).await {
                tracing::warn!(error = %e, "cannot write client status event");
            }
        }));
    }

    /// The main loop, then completion of the appends still outstanding: a message the
    /// client handed over (QoS 0 included) is stored even if the client left right after.
    async fn serve<R, W>(&mut self, reader: &mut R, writer: &mut W, inbuf: BytesMut) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut acks: FuturesOrdered<BoxFuture<'static, AckResult>> = FuturesOrdered::new();
        let end = self.serve_loop(reader, writer, inbuf, &mut acks).await;
        // Each future carries its own timeout, so this ends.
        while let Some(r) = acks.next().await {
            let _ = self.on_ack(r);
        }
        end
    }

    async fn serve_loop<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        mut inbuf: BytesMut,
        acks: &mut FuturesOrdered<BoxFuture<'static, AckResult>>,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut catchup: Option<BoxFuture<'static, CatchupStep>> = None;
        let mut persist: Option<BoxFuture<'static, Result<(), BackendError>>> = None;
        let mut last_persist = Instant::now();
        let mut last_packet = Instant::now();
        // One timer per connection, re-armed only when it fires: an idle connection costs no
        // wake-ups, a busy one no timer churn.
        let keepalive = tokio::time::sleep(self.keep_alive.max(Duration::from_secs(1)));
        tokio::pin!(keepalive);
        let max_packet = self.ctx.limits.max_packet_size();
        let backend_timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        // The kick receiver moves out of `self` so the loop can borrow `self` freely.
        let (_unused, placeholder) = tokio::sync::oneshot::channel();
        let mut kicked = std::mem::replace(&mut self.registration.kicked, placeholder);
        let shutdown = self.ctx.shutdown.clone();

        // Packets that arrived together with CONNECT.
        if let Err(end) = self.decode_all(&mut inbuf, max_packet, acks, backend_timeout).await {
            return end;
        }
        let mut last_read = 0usize;
        // Written but not yet flushed: TLS and WebSocket streams buffer inside, and only a
        // flush pushes the rest out once the socket has room again.
        let mut unflushed = false;
        loop {
            self.flush_pending();
            // Memory follows traffic: a connection whose last read was small and whose
            // buffers are drained holds a few hundred bytes, not kilobytes.
            if inbuf.is_empty() && last_read < IDLE_READ_BUFFER {
                if inbuf.capacity() > IDLE_READ_BUFFER {
                    inbuf = BytesMut::with_capacity(IDLE_READ_BUFFER);
                }
            } else if inbuf.capacity() - inbuf.len() < 1024 {
                inbuf.reserve(BUSY_READ_BUFFER);
            }
            if self.out.is_empty() && self.out.capacity() > 4096 {
                self.out = BytesMut::new();
            }
            let persist_due = self.dirty && self.session_expiry > 0 && persist.is_none();
            let can_read = acks.len() < MAX_OUTSTANDING_APPENDS;
            let can_take = self.pending.len() < PENDING_HIGH_WATER && self.out.len() < OUT_HIGH_WATER;
            if catchup.is_none() && can_take {
                if let Some((tp, lag)) = self.slot.lagging().into_iter().next() {
                    let from = self.state.cursors.get(&tp).map(|c| c.next.min(lag)).unwrap_or(lag);
                    catchup = Some(self.fetch_step(tp, from));
                }
            }
            tokio::select! {
                k = &mut kicked => {
                    return End::Kicked(k.unwrap_or(Kick::Administrative));
                }
                _ = shutdown.cancelled() => return End::Kicked(Kick::Shutdown),
                n = write_or_flush(writer, &self.out), if !self.out.is_empty() || unflushed => {
                    match n {
                        Ok(Some(0)) | Err(_) => return End::Dropped("write failed"),
                        Ok(Some(n)) => { let _ = self.out.split_to(n); unflushed = true; }
                        Ok(None) => unflushed = false,
                    }
                }
                Some(r) = acks.next(), if !acks.is_empty() => {
                    if let Err(end) = self.on_ack(r) { return end; }
                    // Coalesce: take every acknowledgement that is already complete.
                    while let Some(Some(r)) = acks.next().now_or_never() {
                        if let Err(end) = self.on_ack(r) { return end; }
                    }
                }
                read = reader.read_buf(&mut inbuf), if can_read => {
                    match read {
                        Ok(0) => return End::Dropped("connection closed by peer"),
                        Err(_) => return End::Dropped("read error"),
                        Ok(n) => {
                            last_read = n;
                            last_packet = Instant::now();
                            if let Err(end) = self.decode_all(&mut inbuf, max_packet, acks, backend_timeout).await {
                                return end;
                            }
                        }
                    }
                }
                d = self.rx.recv(), if can_take => {
                    let Some(d) = d else { return End::Server(ReasonCode::SERVER_SHUTTING_DOWN, "router stopped") };
                    self.on_delivery(d);
                    let mut n = 0;
                    while n < 256 && self.pending.len() < PENDING_HIGH_WATER {
                        match self.rx.try_recv() {
                            Ok(d) => self.on_delivery(d),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                step = async { match catchup.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if catchup.is_some() && can_take => {
                    catchup = self.on_catchup(step);
                }
                _ = self.slot.lag_notify.notified(), if catchup.is_none() => {}
                res = async { match persist.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if persist.is_some() => {
                    persist = None;
                    if let Err(e) = res {
                        tracing::warn!(client_id = %self.client_id, error = %e, "cannot save session");
                        self.dirty = true;
                    }
                }
                _ = tokio::time::sleep_until(last_persist + PERSIST_EVERY), if persist_due => {
                    self.dirty = false;
                    last_persist = Instant::now();
                    self.advance_idle_cursors();
                    let stored = Stored::from_state(&self.state, self.session_expiry, None);
                    persist = Some(self.ctx.backend.put_state(StateStore::Sessions, &self.client_id, Some(stored.encode())));
                    self.stored = true;
                }
                _ = &mut keepalive, if !self.keep_alive.is_zero() => {
                    let deadline = last_packet + self.keep_alive;
                    if Instant::now() >= deadline {
                        return End::Server(ReasonCode::KEEP_ALIVE_TIMEOUT, "keepalive timeout");
                    }
                    keepalive.as_mut().reset(deadline);
                }
            }
        }
    }

    async fn decode_all(
        &mut self,
        inbuf: &mut BytesMut,
        max_packet: usize,
        acks: &mut FuturesOrdered<BoxFuture<'static, AckResult>>,
        backend_timeout: Duration,
    ) -> Result<(), End> {
        loop {
            match protocol::decode(inbuf, self.protocol, max_packet) {
                Ok(Some(p)) => self.on_packet(p, acks, backend_timeout).await?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::debug!(client_id = %self.client_id, error = %e, "malformed packet");
                    return Err(End::Server(e.reason_code(), "malformed packet"));
                }
            }
        }
    }

    async fn on_packet(
        &mut self,
        packet: Packet,
        acks: &mut FuturesOrdered<BoxFuture<'static, AckResult>>,
        backend_timeout: Duration,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, acks, backend_timeout).await,
            Packet::PubAck(r) => {
                if let Some(o) = self.state.outbound.remove(&r.packet_id) {
                    self.state.ack_origin(&o.origin);
                    self.dirty = true;
                }
                Ok(())
            }
            Packet::PubRec(r) => {
                let pid = r.packet_id;
                if r.code.is_error() {
                    if let Some(o) = self.state.outbound.remove(&pid) {
                        self.state.ack_origin(&o.origin);
                    }
                    return Ok(());
                }
                let origin = match self.state.outbound.get_mut(&pid) {
                    Some(o) => {
                        o.stage = OutboundStage::Released;
                        o.origin.clone()
                    }
                    None if self.protocol == Protocol::V5 => {
                        let mut rel = PubResponse::new(pid);
                        rel.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                        self.send(&Packet::PubRel(rel));
                        return Ok(());
                    }
                    None => None,
                };
                self.state.ack_origin(&origin);
                self.dirty = true;
                self.send(&Packet::PubRel(PubResponse::new(pid)));
                Ok(())
            }
            Packet::PubComp(r) => {
                if self.state.outbound.remove(&r.packet_id).is_some() {
                    self.dirty = true;
                }
                Ok(())
            }
            Packet::PubRel(r) => {
                let known = self.state.inbound_qos2.remove(&r.packet_id.get());
                if known {
                    self.dirty = true;
                }
                let mut comp = PubResponse::new(r.packet_id);
                if !known && self.protocol == Protocol::V5 {
                    comp.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.send(&Packet::PubComp(comp));
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    if self.expiry_was_zero && e > 0 {
                        return Err(End::Server(
                            ReasonCode::PROTOCOL_ERROR,
                            "session expiry raised from 0 [MQTT-3.14.2-2]",
                        ));
                    }
                    self.session_expiry = e.min(self.ctx.config.mqtt.session_expiry_max_secs);
                }
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

    /// Refuse a PUBLISH: MQTT 5 QoS 1/2 gets a negative acknowledgement and stays connected;
    /// otherwise the protocol has no negative answer and the connection closes.
    fn refuse_publish(&mut self, p: &Publish, code: ReasonCode, why: &'static str) -> Result<(), End> {
        tracing::debug!(client_id = %self.client_id, topic = %p.topic, reason = why, "publish refused");
        match (self.protocol, p.qos, p.packet_id) {
            (Protocol::V5, QoS::AtLeastOnce, Some(pid)) => {
                self.send(&Packet::PubAck(PubResponse { packet_id: pid, code, properties: AckProperties::default() }));
                Ok(())
            }
            (Protocol::V5, QoS::ExactlyOnce, Some(pid)) => {
                self.send(&Packet::PubRec(PubResponse { packet_id: pid, code, properties: AckProperties::default() }));
                Ok(())
            }
            _ => Err(End::Server(code, why)),
        }
    }

    async fn on_publish(
        &mut self,
        mut p: Publish,
        acks: &mut FuturesOrdered<BoxFuture<'static, AckResult>>,
        backend_timeout: Duration,
    ) -> Result<(), End> {
        // Topic alias (MQTT 5, client → server).
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.ctx.config.mqtt.topic_alias_max {
                return Err(End::Server(ReasonCode::TOPIC_ALIAS_INVALID, "topic alias out of range [MQTT-3.3.2-9]"));
            }
            if p.topic.is_empty() {
                match self.topic_aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(End::Server(ReasonCode::PROTOCOL_ERROR, "unknown topic alias")),
                }
            } else {
                self.topic_aliases.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(End::Server(ReasonCode::PROTOCOL_ERROR, "empty topic without alias [MQTT-4.7.3-1]"));
        }
        if p.qos != QoS::AtMostOnce {
            self.inbound_inflight += 1;
            if self.protocol == Protocol::V5
                && self.inbound_inflight > usize::from(self.ctx.config.mqtt.receive_maximum)
            {
                return Err(End::Server(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
            }
        }
        if let Err(r) = self.ctx.limits.check_payload(p.payload.len()) {
            self.done_inbound(p.qos);
            return Err(End::Server(r.reason_code(), "payload too large"));
        }
        if p.retain && !self.ctx.config.mqtt.retain_available {
            self.done_inbound(p.qos);
            return Err(End::Server(ReasonCode::RETAIN_NOT_SUPPORTED, "retain not supported"));
        }
        if p.topic.starts_with('$')
            || self.ctx.limits.check_topic(&p.topic).is_err()
            || topic::validate_name(&p.topic).is_err()
        {
            self.done_inbound(p.qos);
            return self.refuse_publish(&p, ReasonCode::TOPIC_NAME_INVALID, "topic name not allowed");
        }
        let Some(core) = self.ctx.router.topics().core_topic(topic::parent(&p.topic)) else {
            self.done_inbound(p.qos);
            return self.refuse_publish(&p, ReasonCode::TOPIC_NAME_INVALID, "parent topic not declared");
        };
        // QoS 2 re-sent before PUBREL: already stored, acknowledge again without storing twice.
        if let (QoS::ExactlyOnce, Some(pid)) = (p.qos, p.packet_id) {
            if self.state.inbound_qos2.contains(&pid.get()) {
                self.done_inbound(p.qos);
                self.send(&Packet::PubRec(PubResponse::new(pid)));
                return Ok(());
            }
        }
        if let Err(e) = self.ctx.router.ensure_core_topic(&core).await {
            tracing::warn!(error = %e, "cannot create core topic");
            self.done_inbound(p.qos);
            return Err(End::Server(ReasonCode::SERVER_BUSY, "core service unavailable"));
        }
        let message = Arc::new(Message {
            topic: p.topic.as_str().into(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            publisher: self.slot.client_id.clone(),
            payload_format_indicator: p.properties.payload_format_indicator,
            message_expiry_interval: p.properties.message_expiry_interval,
            content_type: p.properties.content_type.clone(),
            response_topic: p.properties.response_topic.clone(),
            correlation_data: p.properties.correlation_data.clone(),
            user_properties: std::mem::take(&mut p.properties.user_properties),
            timestamp_ms: now_ms(),
        });
        let fut = store_message(&self.ctx, &core.name, message);
        let (packet_id, qos) = (p.packet_id, p.qos);
        acks.push_back(
            async move {
                let outcome = match tokio::time::timeout(backend_timeout, fut).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no acknowledgement within {backend_timeout:?}")),
                };
                AckResult { packet_id, qos, outcome }
            }
            .boxed(),
        );
        Ok(())
    }

    fn done_inbound(&mut self, qos: QoS) {
        if qos != QoS::AtMostOnce {
            self.inbound_inflight = self.inbound_inflight.saturating_sub(1);
        }
    }

    fn on_ack(&mut self, r: AckResult) -> Result<(), End> {
        self.done_inbound(r.qos);
        match (r.outcome, r.qos, r.packet_id) {
            (Ok(()), QoS::AtMostOnce, _) => Ok(()),
            (Ok(()), QoS::AtLeastOnce, Some(pid)) => {
                self.send(&Packet::PubAck(PubResponse::new(pid)));
                Ok(())
            }
            (Ok(()), QoS::ExactlyOnce, Some(pid)) => {
                self.state.inbound_qos2.insert(pid.get());
                self.dirty = true;
                self.send(&Packet::PubRec(PubResponse::new(pid)));
                Ok(())
            }
            (Err(e), QoS::AtMostOnce, _) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "QoS 0 message not stored");
                Ok(())
            }
            (Err(e), _, _) => {
                // Never acknowledged: the client keeps the message and re-sends it.
                tracing::warn!(client_id = %self.client_id, error = %e, "message not stored; disconnecting without acknowledging it");
                Err(End::Server(ReasonCode::SERVER_BUSY, "core service did not acknowledge"))
            }
            (Ok(()), _, None) => Ok(()),
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained: Vec<(Arc<Message>, QoS, Vec<u32>)> = Vec::new();
        let router = self.ctx.router.clone();
        for (filter, options) in &s.filters {
            let parsed = match topic::parse_filter(filter) {
                Ok(p) => p,
                Err(_) => {
                    codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if parsed.group.is_some() && options.no_local {
                return Err(End::Server(
                    ReasonCode::PROTOCOL_ERROR,
                    "no local on a shared subscription [MQTT-3.8.3-4]",
                ));
            }
            if self.ctx.limits.check_filter(parsed.filter).is_err() {
                codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            let exists = self.state.subscription(filter).is_some();
            if !exists && self.ctx.limits.check_subscription_count(self.state.subscriptions.len()).is_err() {
                codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let positions = match router.subscribe(&self.slot, filter, options.qos).await {
                Ok(p) => p,
                Err(crate::router::RouterError::UndeclaredParent(_)) => {
                    codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "subscribe failed");
                    codes.push(ReasonCode::UNSPECIFIED_ERROR);
                    continue;
                }
            };
            for (tp, live) in positions {
                self.state.cursor(&tp, live);
            }
            let sub = Subscription {
                filter: filter.clone(),
                options: *options,
                identifier: s.properties.subscription_identifier,
            };
            self.state.subscribe(sub);
            self.dirty = true;
            codes.push(ReasonCode(options.qos as u8));
            let send_retained = parsed.group.is_none()
                && match options.retain_handling {
                    RetainHandling::OnSubscribe => true,
                    RetainHandling::OnNewSubscription => !exists,
                    RetainHandling::Never => false,
                };
            if send_retained {
                let now = now_ms();
                for m in router.retained_matching(parsed.filter) {
                    if !m.expired(now) {
                        let qos = m.qos.min(options.qos);
                        retained.push((m, qos, s.properties.subscription_identifier.into_iter().collect()));
                    }
                }
            }
        }
        self.send(&Packet::SubAck(SubAck { packet_id: s.packet_id, codes, properties: AckProperties::default() }));
        for (message, qos, subscription_ids) in retained {
            self.pending.push_back(Pending { message, qos, retain: true, subscription_ids, origin: None });
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.state.unsubscribe(f);
            self.ctx.router.unsubscribe(&self.slot, f);
            codes.push(if existed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        self.dirty = true;
        self.send(&Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, codes, properties: AckProperties::default() }));
    }

    fn on_delivery(&mut self, d: Delivery) {
        match d {
            Delivery::Live { record, message, shared } => {
                self.consider(&record.tp, record.offset, message, shared.as_deref());
            }
            Delivery::Replay { records } => {
                for (record, message) in records {
                    self.consider(&record.tp, record.offset, message, None);
                }
            }
        }
    }

    /// A record of the core service reached this session (live, replayed or read back).
    fn consider(&mut self, tp: &TopicPartition, offset: u64, message: Arc<Message>, shared: Option<&str>) {
        if shared.is_none() {
            let cursor = self.state.cursor(tp, offset);
            if offset < cursor.next || cursor.already_handled(offset) {
                return;
            }
            cursor.next = offset + 1;
        }
        if message.expired(now_ms()) {
            return;
        }
        let Some(m) = self.state.matches(&message, shared) else { return };
        let origin = if m.qos != QoS::AtMostOnce && shared.is_none() {
            self.state.cursor(tp, offset).pending.insert(offset);
            Some(Origin { tp: tp.clone(), offset })
        } else {
            None
        };
        let retain = m.retain_as_published && message.retain;
        self.pending.push_back(Pending { message, qos: m.qos, retain, subscription_ids: m.subscription_ids, origin });
        self.dirty = true;
    }

    /// Move messages from the pending queue into the in-flight window and the write buffer.
    fn flush_pending(&mut self) {
        while self.out.len() < OUT_HIGH_WATER {
            let Some(front) = self.pending.front() else { break };
            if front.qos != QoS::AtMostOnce && self.state.outbound.len() >= self.window {
                break;
            }
            let Some(p) = self.pending.pop_front() else { break };
            if p.message.expired(now_ms()) {
                self.state.ack_origin(&p.origin);
                continue;
            }
            let pid = if p.qos == QoS::AtMostOnce { None } else { self.state.next_packet_id() };
            let o = Outbound {
                message: p.message,
                qos: p.qos,
                retain: p.retain,
                subscription_ids: p.subscription_ids,
                origin: p.origin,
                stage: OutboundStage::Published,
            };
            let packet = Packet::Publish(publish_packet(&o, pid, false, self.protocol));
            if let Some(max) = self.client_max_packet {
                if protocol::encoded_len(&packet, self.protocol).map(|l| l > max).unwrap_or(true) {
                    // Too large for this client: dropped as if delivered [MQTT-3.1.2-25].
                    self.state.ack_origin(&o.origin);
                    continue;
                }
            }
            if protocol::encode(&packet, self.protocol, &mut self.out).is_err() {
                self.state.ack_origin(&o.origin);
                continue;
            }
            if let Some(pid) = pid {
                self.state.outbound.insert(pid, o);
            }
        }
    }

    /// Move cursors past records that were routed but did not match this session, so a
    /// later catch-up does not re-read them. Safe only for partitions delivered live with an
    /// empty queue: the routing position is read first, and every matching record below it
    /// was put in the queue before the position moved.
    fn advance_idle_cursors(&mut self) {
        let tps: Vec<TopicPartition> = self.state.cursors.keys().cloned().collect();
        let positions = self.ctx.router.positions_of(&tps);
        if !self.rx.is_empty() {
            return;
        }
        let lagging: Vec<TopicPartition> = self.slot.lagging().into_iter().map(|(tp, _)| tp).collect();
        for (tp, pos) in positions {
            if lagging.contains(&tp) {
                continue;
            }
            if let Some(c) = self.state.cursors.get_mut(&tp) {
                c.next = c.next.max(pos);
            }
        }
    }

    fn fetch_step(&self, tp: TopicPartition, from: u64) -> BoxFuture<'static, CatchupStep> {
        let fut = self.ctx.backend.fetch(&tp, from, CATCHUP_BATCH);
        async move { CatchupStep::Fetched(tp, fut.await) }.boxed()
    }

    fn on_catchup(&mut self, step: CatchupStep) -> Option<BoxFuture<'static, CatchupStep>> {
        match step {
            CatchupStep::Fetched(tp, Ok(f)) => {
                for rec in &f.records {
                    if let Some(message) = record_message(&self.ctx, &rec.tp, &rec.record) {
                        self.consider(&rec.tp, rec.offset, message, None);
                    } else {
                        let c = self.state.cursor(&rec.tp, rec.offset);
                        c.next = c.next.max(rec.offset + 1);
                    }
                }
                let c = self.state.cursor(&tp, f.next_offset);
                c.next = c.next.max(f.next_offset);
                let next = c.next;
                if f.records.is_empty() || f.next_offset >= f.high_watermark {
                    let router = self.ctx.router.clone();
                    let slot = self.slot.clone();
                    Some(
                        async move { CatchupStep::Reattached(tp.clone(), next, router.reattach(slot, tp, next).await) }
                            .boxed(),
                    )
                } else {
                    Some(self.fetch_step(tp, next))
                }
            }
            CatchupStep::Fetched(tp, Err(e)) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "reading back from the core service failed; retrying");
                let from = self.state.cursors.get(&tp).map(|c| c.next).unwrap_or(0);
                Some(
                    async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        CatchupStep::Retry(tp, from)
                    }
                    .boxed(),
                )
            }
            CatchupStep::Retry(tp, from) => Some(self.fetch_step(tp, from)),
            CatchupStep::Reattached(_, _, Ok(Reattach::Attached)) => None,
            CatchupStep::Reattached(tp, _, Ok(Reattach::Behind(from))) => Some(self.fetch_step(tp, from)),
            CatchupStep::Reattached(tp, from, Err(_)) => Some(
                async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    CatchupStep::Retry(tp, from)
                }
                .boxed(),
            ),
        }
    }

    fn send(&mut self, p: &Packet) {
        if let Err(e) = protocol::encode(p, self.protocol, &mut self.out) {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot encode packet");
        }
    }

    /// After the loop: tell the client why, save or drop the session, publish the will,
    /// write events, leave the router and registry.
    async fn finish<W: AsyncWrite + Unpin>(mut self, end: End, writer: &mut W) {
        let (reason, publish_will, event_reason) = match &end {
            End::ClientDisconnect { with_will } => (None, *with_will, "client disconnect".to_string()),
            End::Dropped(why) => (None, true, why.to_string()),
            End::Server(code, why) => (Some(*code), true, why.to_string()),
            End::Kicked(Kick::TakenOver { new_clean_start }) => {
                // MQTT 5: the old connection's will is sent unless the new one resumes the
                // session and the will is delayed.
                let delayed = self.will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0) > 0;
                (Some(ReasonCode::SESSION_TAKEN_OVER), *new_clean_start || !delayed, "session taken over".to_string())
            }
            End::Kicked(Kick::Shutdown) => {
                (Some(ReasonCode::SERVER_SHUTTING_DOWN), true, "server shutting down".to_string())
            }
            End::Kicked(Kick::Administrative) => (Some(ReasonCode::ADMINISTRATIVE_ACTION), true, "kicked".to_string()),
        };
        if matches!(end, End::ClientDisconnect { .. }) {
            self.emit(EventType::Disconnect, None);
        }
        if let (Some(code), Protocol::V5) = (reason, self.protocol) {
            let d = Disconnect { code, properties: DisconnectProperties::default() };
            self.send(&Packet::Disconnect(d));
        }
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
            })
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;

        // Leave the router first so no more deliveries queue up.
        let filters: Vec<String> = self.state.subscriptions.iter().map(|s| s.filter.clone()).collect();
        self.ctx.router.unregister(&self.slot, &filters);
        // Messages still pending were never sent; their positions stay uncommitted, so a
        // persistent session gets them on reconnect.
        let backend = self.ctx.backend.clone();
        let save = if self.session_expiry > 0 {
            let stored = Stored::from_state(&self.state, self.session_expiry, Some(now_ms()));
            backend.put_state(StateStore::Sessions, &self.client_id, Some(stored.encode()))
        } else if self.stored {
            backend.put_state(StateStore::Sessions, &self.client_id, None)
        } else {
            async { Ok(()) }.boxed()
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs), save)
            .await
            .unwrap_or(Err(BackendError::Timeout(Duration::from_secs(0))))
        {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot save session at disconnect");
        }
        if publish_will {
            if let Some(will) = self.will.take() {
                self.schedule_will(will);
            }
        }
        self.emit(EventType::Tcpclean, Some(event_reason));
        // Written before we report done: a takeover's `connect` follows our `tcpclean`, and a
        // shutdown does not close the core service under it.
        if let Some(last) = self.last_event.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), last).await;
        }
        let _ = self.registration.done.send(true);
        self.ctx.registry.release(&self.client_id, self.registration.conn_id);
        tracing::debug!(client_id = %self.client_id, ?end, "client disconnected");
    }

    fn schedule_will(&self, will: LastWill) {
        let delay = will.properties.will_delay_interval.unwrap_or(0).min(self.session_expiry);
        let ctx = self.ctx.clone();
        let client_id = self.client_id.clone();
        let message = Arc::new(Message {
            topic: will.topic.as_str().into(),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            publisher: client_id.as_str().into(),
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            content_type: will.properties.content_type.clone(),
            response_topic: will.properties.response_topic.clone(),
            correlation_data: will.properties.correlation_data.clone(),
            user_properties: will.properties.user_properties.clone(),
            timestamp_ms: now_ms(),
        });
        let cancel = (delay > 0).then(|| ctx.registry.park_will(&client_id));
        tokio::spawn(async move {
            if let Some(cancel) = cancel {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                    _ = cancel => return,
                }
                ctx.registry.will_done(&client_id);
            }
            let Some(core) = ctx.router.topics().core_topic(topic::parent(&message.topic)) else {
                tracing::warn!(client_id, topic = %message.topic, "will topic's parent is not declared; will dropped");
                return;
            };
            if let Err(e) = ctx.router.ensure_core_topic(&core).await {
                tracing::warn!(client_id, error = %e, "cannot publish will");
                return;
            }
            if let Err(e) = store_message(&ctx, &core.name, with_timestamp(message, now_ms())).await {
                tracing::warn!(client_id, error = %e, "cannot publish will");
            }
        });
    }
}

fn with_timestamp(message: Arc<Message>, ts: i64) -> Arc<Message> {
    let mut m = (*message).clone();
    m.timestamp_ms = ts;
    Arc::new(m)
}

/// Append a message to its core topic and, when retained, update the retained store.
/// Resolves when both are durable.
fn store_message(
    ctx: &Arc<Context>,
    core: &str,
    message: Arc<Message>,
) -> BoxFuture<'static, Result<(), BackendError>> {
    let record = ctx.router.topics().to_record(&message);
    let append = ctx.backend.append(core, record.clone());
    if !message.retain {
        return async move { append.await.map(|_| ()) }.boxed();
    }
    let value = (!message.payload.is_empty()).then(|| mapping::encode_record(&record));
    let retained = ctx.backend.put_state(StateStore::Retained, &message.topic, value);
    let ctx = ctx.clone();
    async move {
        // `try_join` polls the append first, so its place in the per-key order is kept.
        futures::try_join!(append, retained)?;
        let local = (!message.payload.is_empty()).then(|| message.clone());
        ctx.router.apply_retained(&message.topic, local);
        Ok(())
    }
    .boxed()
}

fn record_message(ctx: &Context, tp: &TopicPartition, rec: &crate::backend::CoreRecord) -> Option<Arc<Message>> {
    let parent = ctx.router.topics().parent_of_core(&tp.topic)?;
    mapping::record_to_message(parent, rec).map(Arc::new)
}

fn publish_packet(o: &Outbound, packet_id: Option<PacketId>, dup: bool, protocol: Protocol) -> Publish {
    let mut properties =
        if protocol == Protocol::V5 { o.message.publish_properties(now_ms()) } else { PublishProperties::default() };
    if protocol == Protocol::V5 {
        properties.subscription_identifiers = o.subscription_ids.clone();
    }
    Publish {
        dup: dup && o.qos != QoS::AtMostOnce,
        qos: o.qos,
        retain: o.retain,
        topic: o.message.topic.to_string(),
        packet_id,
        payload: o.message.payload.clone(),
        properties,
    }
}

fn empty_message() -> Message {
    Message {
        topic: "".into(),
        payload: Bytes::new(),
        qos: QoS::AtLeastOnce,
        retain: false,
        publisher: "".into(),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
        timestamp_ms: 0,
    }
}
