//! The MQTT session as a state machine with no I/O: what the gateway owes one client and
//! what the client owes it, from the moment a message reaches the session to its last
//! acknowledgement.
//!
//! The connection (the driver) feeds it events and carries out what it returns:
//! - [`Session::on_delivery`] / [`Session::consider`]: a record of the core service reached
//!   the session (live from the router, replayed, or read back). Records below the read
//!   position or already handled are ignored; the rest are matched against the
//!   subscriptions and, if they match and have not expired, queued. QoS 1/2 ones become
//!   pending at their offset, so the read position cannot pass them before they are acked.
//! - [`Session::queue_retained`]: retained messages answering a SUBSCRIBE.
//! - [`Session::next_publish`]: the next PUBLISH to write, while the driver has room. It
//!   respects the in-flight window (QoS 1/2 only), assigns packet identifiers, drops what
//!   expired while queued or is larger than the client's Maximum Packet Size (as if
//!   delivered [MQTT-3.1.2-25]), and uses topic aliases towards MQTT 5 clients.
//! - [`Session::on_client_ack`]: PUBACK, PUBREC, PUBCOMP for delivered messages, PUBREL for
//!   received QoS 2 ones. It says what to answer, whether the session changed (to be saved
//!   at the next checkpoint), which delivered message was acknowledged (for the trace) and
//!   how many acknowledgements its partition now remembers above the oldest unacknowledged
//!   message (bounded by the driver).
//! - [`Session::resend_inflight`]: what a resumed session sends again first.
//!
//! Subscriptions, read positions and the messages in flight are [`SessionState`] (the
//! part that is persisted); the queue, the window and the aliases live and die with one
//! connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::backend::TopicPartition;
use crate::protocol::{
    self, LastWill, Packet, PacketId, Protocol, PubResponse, Publish, PublishProperties, QoS, ReasonCode,
    RetainHandling, Subscribe, SubscriptionOptions,
};
use crate::router::mapping::Message;
use crate::router::Delivery;

use super::persist::StoredInflight;
use super::state::{Origin, Outbound, OutboundStage, Pending, SessionState, Subscription};

/// What one connection allows the session to send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// QoS 1/2 deliveries in flight at most (the client's Receive Maximum, capped).
    pub window: usize,
    /// The client's Maximum Packet Size, if it announced one.
    pub client_max_packet: Option<usize>,
    /// Topic aliases the gateway may assign towards the client (MQTT 5; 0: none).
    pub topic_alias_max: u16,
    /// Topic aliases the client may assign (our Topic Alias Maximum, MQTT 5).
    pub client_alias_max: u16,
    /// QoS 1/2 PUBLISHes the client may have unacknowledged (our Receive Maximum; MQTT 5
    /// clients that exceed it are disconnected).
    pub receive_maximum: u16,
}

/// One client's session while it is connected.
pub struct Session {
    /// Subscriptions, read positions, messages in flight: what is persisted.
    pub state: SessionState,
    /// Session Expiry Interval, seconds (0: the session ends with the connection).
    pub expiry: u32,
    /// The expiry given at CONNECT was 0: DISCONNECT may not raise it [MQTT-3.14.2-2].
    expiry_was_zero: bool,
    /// The client's will, while it may still be published.
    pub will: Option<LastWill>,
    /// Changed since the last save: a persistent session is saved at the next checkpoint.
    pub changed: bool,
    /// A change that does not wait for the next checkpoint (a new connection's session, a
    /// subscription change): the save starts at once, so a crash right after cannot lose it.
    pub save_soon: bool,
    protocol: Protocol,
    window: usize,
    client_max_packet: Option<usize>,
    aliases: OutAliases,
    /// Matched messages waiting for room in the window or in the driver's output.
    queue: VecDeque<Pending>,
    /// Retained messages in `queue` that answer a SUBSCRIBE (bounded by the driver).
    retained_waiting: usize,
    /// Topic aliases the client assigned (at most `client_alias_max`).
    client_aliases: HashMap<u16, String>,
    client_alias_max: u16,
    receive_maximum: u16,
    /// QoS 1/2 PUBLISHes received and not acknowledged yet (QoS 2: until their PUBREL).
    receiving: usize,
    /// QoS 2 packet identifiers whose PUBLISH is being stored.
    qos2_storing: HashSet<u16>,
    /// PUBRECs of a persistent session waiting for its next save (the packet identifier must
    /// be stored before the PUBREC goes out), and those waiting for the save in flight.
    pubrec_waiting: Vec<PubResponse>,
    pubrec_saving: Vec<PubResponse>,
}

/// A PUBLISH from the client that breaks the protocol: the connection closes with this
/// reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: ReasonCode,
    pub why: &'static str,
}

/// A QoS 2 PUBLISH from the client, seen against the ones received before.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned and consumed at once, like `Next`
pub enum Qos2Publish {
    /// Not seen before (or completed with PUBREL): to be stored.
    New,
    /// Re-sent before its PUBREL: not stored again. `reply` is the PUBREC to send again, if
    /// one is not already on its way (it is not while the first copy is still being stored,
    /// or while its PUBREC waits for a session save).
    Duplicate { reply: Option<Packet> },
}

/// The core service's answer to the append of a PUBLISH from the client.
#[derive(Debug)]
pub struct Appended {
    pub packet_id: Option<PacketId>,
    pub qos: QoS,
    pub outcome: Result<(), String>,
    /// The stored message's ID, for the MQTT 5 PUBACK / PUBREC.
    pub msg_id: Option<Arc<str>>,
}

/// What an append result does.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned and consumed at once, like `Next`
pub enum AppendStep {
    /// Stored: the acknowledgement to send now, if any; `changed` when the session must be
    /// saved (a QoS 2 packet identifier to remember, whose PUBREC waits for that save when the
    /// session is persistent).
    Stored { reply: Option<Packet>, changed: bool },
    /// A QoS 0 message the core service did not store (nothing to tell the client).
    LostQos0(String),
    /// A QoS 1/2 message not stored: never acknowledged; the client keeps it and re-sends it
    /// on its next connection.
    Failed(String),
}

/// What [`Session::next_publish`] produced.
#[derive(Debug)]
// Returned and consumed at once, never stored: boxing the packet would cost an allocation
// per delivery for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    /// A PUBLISH to write: `len` bytes encoded. QoS 1/2 ones are in flight already.
    Send { packet: Packet, len: usize, message: Arc<Message>, qos: QoS, packet_id: Option<PacketId> },
    /// A queued message that is not delivered, and why. Its read position moves on.
    Dropped { message: Arc<Message>, why: Dropped },
}

/// Why a queued message was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its message expiry interval passed while it waited.
    Expired,
    /// Its PUBLISH (this many bytes) exceeds the client's Maximum Packet Size.
    TooLarge(usize),
    /// It cannot be encoded as a PUBLISH (a field beyond the protocol's limits).
    Unencodable,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dropped::Expired => f.write_str("message expiry interval passed"),
            Dropped::TooLarge(len) => write!(f, "{len} bytes exceed the client's maximum packet size"),
            Dropped::Unencodable => f.write_str("cannot be encoded as a PUBLISH"),
        }
    }
}

/// An acknowledgement packet from the client.
#[derive(Debug, Clone)]
pub enum ClientAck {
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubComp(PubResponse),
    PubRel(PubResponse),
}

/// How the client acknowledged a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// QoS 1, with the client's reason code.
    PubAck(ReasonCode),
    /// QoS 2, first step (the message is the client's now; PUBREL follows).
    PubRec,
}

impl std::fmt::Display for Acked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acked::PubAck(code) => write!(f, "puback {}", code.0),
            Acked::PubRec => f.write_str("pubrec"),
        }
    }
}

/// What an acknowledgement did to the session.
#[derive(Debug, Default)]
pub struct AckStep {
    /// The answer to send: PUBREL after a PUBREC, PUBCOMP after a PUBREL.
    pub reply: Option<Packet>,
    /// The session changed; the next checkpoint saves it.
    pub changed: bool,
    /// The delivered message the client acknowledged, and how.
    pub acked: Option<(Arc<Message>, Acked)>,
    /// Acknowledgements the message's partition now remembers above its oldest
    /// unacknowledged message (0 when none).
    pub acked_above: usize,
    /// A QoS 2 message from the client is complete (its PUBREL came): one slot of the
    /// receive window is free again.
    pub inbound_done: bool,
}

impl Session {
    pub fn new(state: SessionState, protocol: Protocol, limits: Limits) -> Session {
        let alias_max = if protocol == Protocol::V5 { limits.topic_alias_max } else { 0 };
        Session {
            protocol,
            window: limits.window.max(1),
            client_max_packet: limits.client_max_packet,
            aliases: OutAliases::new(alias_max),
            queue: VecDeque::new(),
            retained_waiting: 0,
            expiry: 0,
            expiry_was_zero: true,
            will: None,
            changed: false,
            save_soon: false,
            client_aliases: HashMap::new(),
            client_alias_max: limits.client_alias_max,
            receive_maximum: limits.receive_maximum,
            // QoS 2 PUBLISHes of a restored session waiting for PUBREL still count.
            receiving: state.inbound_qos2.len(),
            state,
            qos2_storing: HashSet::new(),
            pubrec_waiting: Vec::new(),
            pubrec_saving: Vec::new(),
        }
    }

    /// The Session Expiry Interval and the will given at CONNECT.
    pub fn with_lifetime(mut self, expiry: u32, will: Option<LastWill>) -> Session {
        self.expiry = expiry;
        self.expiry_was_zero = expiry == 0;
        self.will = will;
        self
    }

    /// The session outlives the connection (and is saved).
    pub fn persistent(&self) -> bool {
        self.expiry > 0
    }

    /// A DISCONNECT may set a new Session Expiry Interval (capped at `max`), but not raise it
    /// from 0 [MQTT-3.14.2-2].
    pub fn on_disconnect_expiry(&mut self, requested: Option<u32>, max: u32) -> Result<(), Violation> {
        let Some(e) = requested else { return Ok(()) };
        if self.expiry_was_zero && e > 0 {
            return Err(Violation {
                code: ReasonCode::PROTOCOL_ERROR,
                why: "session expiry raised from 0 [MQTT-3.14.2-2]",
            });
        }
        self.expiry = e.min(max);
        Ok(())
    }

    /// Messages queued, not yet written.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Retained messages queued for SUBSCRIBEs, not yet written.
    pub fn retained_waiting(&self) -> usize {
        self.retained_waiting
    }

    /// Something the router delivered. Returns whether a message was queued.
    pub fn on_delivery(&mut self, d: Delivery, now_ms: i64) -> bool {
        match d {
            Delivery::Live(record, message) => self.consider(&record.tp, record.offset, message, None, now_ms),
            Delivery::Shared(shared) => {
                let (record, message, filter) = *shared;
                self.consider(&record.tp, record.offset, message, Some(&filter), now_ms)
            }
            Delivery::Replay(records) => {
                let mut queued = false;
                for (record, message) in *records {
                    queued |= self.consider(&record.tp, record.offset, message, None, now_ms);
                }
                queued
            }
        }
    }

    /// A record of the core service reached this session (live, replayed or read back;
    /// `shared`: the `$share` filter it was routed for). Plain records below the read
    /// position or already handled are ignored, the position moves past the others.
    /// Returns whether it was queued.
    pub fn consider(
        &mut self,
        tp: &TopicPartition,
        offset: u64,
        message: Arc<Message>,
        shared: Option<&str>,
        now_ms: i64,
    ) -> bool {
        if shared.is_none() {
            let cursor = self.state.cursor(tp, offset);
            if offset < cursor.next || cursor.already_handled(offset) {
                return false;
            }
            cursor.next = offset + 1;
        }
        self.queue_if_matching(tp, offset, message, shared, now_ms)
    }

    /// Queue a message of the core service if it has not expired and matches a subscription
    /// (`shared`: the `$share` filter it came for); QoS 1/2 ones (not shared) become pending
    /// at their offset. Returns whether it was queued.
    pub fn queue_if_matching(
        &mut self,
        tp: &TopicPartition,
        offset: u64,
        message: Arc<Message>,
        shared: Option<&str>,
        now_ms: i64,
    ) -> bool {
        if message.expired(now_ms) {
            return false;
        }
        let Some(m) = self.state.matches(&message, shared) else { return false };
        let origin = if m.qos != QoS::AtMostOnce && shared.is_none() {
            self.state.cursor(tp, offset).pending.insert(offset);
            Some(Origin { tp: tp.clone(), offset })
        } else {
            None
        };
        let retain = m.retain_as_published && message.retain;
        self.changed = true;
        self.queue.push_back(Pending {
            message,
            qos: m.qos,
            retain,
            subscription_ids: m.subscription_ids,
            origin,
            on_subscribe: false,
        });
        true
    }

    /// Queue a retained message answering a SUBSCRIBE (QoS already capped by the
    /// subscription; always sent with RETAIN set).
    pub fn queue_retained(&mut self, message: Arc<Message>, qos: QoS, subscription_ids: Vec<u32>) {
        self.retained_waiting += 1;
        self.queue.push_back(Pending {
            message,
            qos,
            retain: true,
            subscription_ids,
            origin: None,
            on_subscribe: true,
        });
    }

    /// The next queued message to write, if the window allows it: `None` when the queue is
    /// empty or its head is a QoS 1/2 message and the window is full (a QoS 0 head goes
    /// regardless; the queue keeps its order). The driver calls it while it has room.
    pub fn next_publish(&mut self, now_ms: i64) -> Option<Next> {
        let front = self.queue.front()?;
        if front.qos != QoS::AtMostOnce && self.state.outbound.len() >= self.window {
            return None;
        }
        let packet_id = match front.qos {
            QoS::AtMostOnce => None,
            // Every identifier in use: wait for an acknowledgement (the window is smaller
            // than 65,535, so only a restored session could get here).
            _ => Some(self.state.next_packet_id()?),
        };
        let p = self.queue.pop_front()?;
        if p.on_subscribe {
            self.retained_waiting = self.retained_waiting.saturating_sub(1);
        }
        if p.message.expired(now_ms) {
            self.state.ack_origin(&p.origin);
            return Some(Next::Dropped { message: p.message, why: Dropped::Expired });
        }
        let o = Outbound {
            message: p.message,
            qos: p.qos,
            retain: p.retain,
            subscription_ids: p.subscription_ids,
            origin: p.origin,
            stage: OutboundStage::Published,
        };
        let mut packet = Packet::Publish(publish_packet(&o, packet_id, false, self.protocol, now_ms));
        let Some(mut len) = self.encoded_len(&packet) else { return Some(self.drop_outbound(o, Dropped::Unencodable)) };
        if self.client_max_packet.is_some_and(|max| len > max) {
            return Some(self.drop_outbound(o, Dropped::TooLarge(len)));
        }
        // A new alias adds its 3 bytes; a known one replaces the topic by nothing.
        let room_for_new = self.client_max_packet.is_none_or(|max| len + 3 <= max);
        if let (Packet::Publish(publish), Some((alias, known))) =
            (&mut packet, self.aliases.alias(&o.message.topic, room_for_new))
        {
            publish.properties.topic_alias = Some(alias);
            if known {
                publish.topic.clear();
            }
            let Some(aliased) = self.encoded_len(&packet) else {
                return Some(self.drop_outbound(o, Dropped::Unencodable));
            };
            len = aliased;
        }
        let (message, qos) = (o.message.clone(), o.qos);
        if let Some(pid) = packet_id {
            self.state.outbound.insert(pid, o);
        }
        Some(Next::Send { packet, len, message, qos, packet_id })
    }

    /// The driver could not write a PUBLISH [`Session::next_publish`] produced: it is done
    /// with as if delivered, like a dropped one.
    pub fn abandon(&mut self, packet_id: Option<PacketId>) {
        if let Some(o) = packet_id.and_then(|pid| self.state.outbound.remove(&pid)) {
            self.state.ack_origin(&o.origin);
        }
    }

    /// Put back the messages a stored session had in flight: their bodies read back from the
    /// log (`bodies`, by partition and offset; none is needed for a QoS 2 message the client
    /// has received, PUBREL follows). A message whose record is gone by retention, or whose
    /// topic the client may no longer read (`allowed`), is not resent. Each holds its offset
    /// pending, so the read position cannot pass it before it is acknowledged.
    pub fn restore_inflight(
        &mut self,
        inflight: Vec<StoredInflight>,
        mut bodies: HashMap<(TopicPartition, u64), Arc<Message>>,
        allowed: impl Fn(&str) -> bool,
    ) {
        for inf in inflight {
            let Some(pid) = inf.packet_id() else { continue };
            let origin = inf.origin();
            let qos = QoS::from_u8(inf.qos).unwrap_or(QoS::AtLeastOnce);
            let message = if inf.released { None } else { bodies.remove(&(origin.tp.clone(), origin.offset)) };
            if !inf.released && message.is_none() {
                continue; // gone by retention
            }
            if message.as_ref().is_some_and(|m| !allowed(&m.topic)) {
                continue; // its subscription is no longer allowed
            }
            let stage = if inf.released { OutboundStage::Released } else { OutboundStage::Published };
            // A released message is not sent again, only its PUBREL.
            let message = message.unwrap_or_else(|| Arc::new(Message { qos: QoS::AtLeastOnce, ..Message::default() }));
            self.state.cursor(&origin.tp, origin.offset).pending.insert(origin.offset);
            self.state.outbound.insert(
                pid,
                Outbound { message, qos, retain: false, subscription_ids: Vec::new(), origin: Some(origin), stage },
            );
        }
    }

    /// What a resumed session sends first, in packet identifier order: PUBLISH (DUP set)
    /// for messages not yet acknowledged, PUBREL for QoS 2 ones the client has received.
    pub fn resend_inflight(&self, now_ms: i64) -> Vec<Packet> {
        let mut ids: Vec<PacketId> = self.state.outbound.keys().copied().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|pid| {
                let o = self.state.outbound.get(&pid)?;
                Some(match o.stage {
                    OutboundStage::Released => Packet::PubRel(PubResponse::new(pid)),
                    OutboundStage::Published => {
                        Packet::Publish(publish_packet(o, Some(pid), true, self.protocol, now_ms))
                    }
                })
            })
            .collect()
    }

    fn encoded_len(&self, packet: &Packet) -> Option<usize> {
        protocol::encoded_len(packet, self.protocol).ok()
    }

    fn drop_outbound(&mut self, o: Outbound, why: Dropped) -> Next {
        self.state.ack_origin(&o.origin);
        Next::Dropped { message: o.message, why }
    }
}

impl Session {
    /// Apply an acknowledgement from the client. Unknown packet identifiers change nothing;
    /// MQTT 5 clients get reason code 0x92 on the PUBREL or PUBCOMP that answers them.
    pub fn on_client_ack(&mut self, ack: ClientAck) -> AckStep {
        let (protocol, state) = (self.protocol, &mut self.state);
        let mut step = AckStep::default();
        match ack {
            ClientAck::PubAck(r) => {
                if let Some(o) = state.outbound.remove(&r.packet_id) {
                    step.acked_above = state.ack_origin(&o.origin);
                    step.acked = Some((o.message, Acked::PubAck(r.code)));
                    step.changed = true;
                }
            }
            ClientAck::PubRec(r) if r.code.is_error() => {
                // The client refuses the message: it is done with, no PUBREL.
                if let Some(o) = state.outbound.remove(&r.packet_id) {
                    step.acked_above = state.ack_origin(&o.origin);
                    step.changed = true;
                }
            }
            ClientAck::PubRec(r) => {
                let pid = r.packet_id;
                let origin = match state.outbound.get_mut(&pid) {
                    Some(o) => {
                        o.stage = OutboundStage::Released;
                        step.acked = Some((o.message.clone(), Acked::PubRec));
                        o.origin.clone()
                    }
                    None if protocol == Protocol::V5 => {
                        let mut rel = PubResponse::new(pid);
                        rel.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                        step.reply = Some(Packet::PubRel(rel));
                        return step;
                    }
                    None => None,
                };
                step.acked_above = state.ack_origin(&origin);
                step.changed = true;
                step.reply = Some(Packet::PubRel(PubResponse::new(pid)));
            }
            ClientAck::PubComp(r) => {
                step.changed = state.outbound.remove(&r.packet_id).is_some();
            }
            ClientAck::PubRel(r) => {
                let known = state.inbound_qos2.remove(&r.packet_id.get());
                step.changed = known;
                step.inbound_done = known;
                if known {
                    self.receiving = self.receiving.saturating_sub(1);
                    // A client that sends PUBREL before its PUBREC came gets no PUBREC after
                    // the PUBCOMP: it could take it for one of a new message with this id.
                    self.pubrec_waiting.retain(|p| p.packet_id != r.packet_id);
                    self.pubrec_saving.retain(|p| p.packet_id != r.packet_id);
                }
                let mut comp = PubResponse::new(r.packet_id);
                if !known && protocol == Protocol::V5 {
                    comp.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                step.reply = Some(Packet::PubComp(comp));
            }
        }
        self.changed |= step.changed;
        step
    }
}

/// PUBLISHes from the client: topic aliases, the Receive Maximum, QoS 2 exactly once, and the
/// acknowledgements that follow the core service's answer. The driver checks the topic and
/// the rights, builds the record and appends it.
impl Session {
    /// Resolve the client's topic alias (MQTT 5): a PUBLISH without a topic gets its alias'
    /// topic. A new mapping is returned, to be remembered with [`Session::remember_alias`]
    /// only once its topic passed the driver's checks, so the table holds at most
    /// `client_alias_max` valid topics.
    pub fn resolve_alias(&self, p: &mut Publish) -> Result<Option<u16>, Violation> {
        let Some(alias) = p.properties.topic_alias else {
            if p.topic.is_empty() {
                return Err(Violation {
                    code: ReasonCode::PROTOCOL_ERROR,
                    why: "empty topic without alias [MQTT-4.7.3-1]",
                });
            }
            return Ok(None);
        };
        if alias == 0 || alias > self.client_alias_max {
            return Err(Violation {
                code: ReasonCode::TOPIC_ALIAS_INVALID,
                why: "topic alias out of range [MQTT-3.3.2-9]",
            });
        }
        if !p.topic.is_empty() {
            return Ok(Some(alias));
        }
        match self.client_aliases.get(&alias) {
            Some(t) => {
                p.topic.clone_from(t);
                Ok(None)
            }
            None => Err(Violation { code: ReasonCode::PROTOCOL_ERROR, why: "unknown topic alias" }),
        }
    }

    pub fn remember_alias(&mut self, alias: u16, topic: String) {
        self.client_aliases.insert(alias, topic);
    }

    /// A QoS 1/2 PUBLISH arrives: it counts against the Receive Maximum until acknowledged
    /// (QoS 2: until its PUBREL). An MQTT 5 client beyond it breaks the protocol.
    pub fn begin_receive(&mut self, qos: QoS) -> Result<(), Violation> {
        if qos == QoS::AtMostOnce {
            return Ok(());
        }
        self.receiving += 1;
        if self.protocol == Protocol::V5 && self.receiving > usize::from(self.receive_maximum) {
            return Err(Violation { code: ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, why: "receive maximum exceeded" });
        }
        Ok(())
    }

    /// A PUBLISH that counted against the Receive Maximum is done with (refused, or answered).
    pub fn end_receive(&mut self, qos: QoS) {
        if qos != QoS::AtMostOnce {
            self.receiving = self.receiving.saturating_sub(1);
        }
    }

    /// A QoS 2 PUBLISH (counted by [`Session::begin_receive`]): new, or a re-send of one
    /// stored or being stored, which is answered without storing it twice and frees its slot.
    pub fn on_qos2_publish(&mut self, pid: PacketId) -> Qos2Publish {
        if self.qos2_storing.contains(&pid.get()) {
            self.end_receive(QoS::ExactlyOnce);
            return Qos2Publish::Duplicate { reply: None };
        }
        if !self.state.inbound_qos2.contains(&pid.get()) {
            return Qos2Publish::New;
        }
        self.end_receive(QoS::ExactlyOnce);
        let waiting = |v: &[PubResponse]| v.iter().any(|r| r.packet_id == pid);
        let reply = (!waiting(&self.pubrec_waiting) && !waiting(&self.pubrec_saving))
            .then(|| Packet::PubRec(PubResponse::new(pid)));
        Qos2Publish::Duplicate { reply }
    }

    /// A PUBLISH counted by [`Session::begin_receive`] (and, QoS 2, marked as being stored)
    /// was refused before its append: it is neither stored nor being stored.
    pub fn not_stored(&mut self, qos: QoS, packet_id: Option<PacketId>) {
        self.end_receive(qos);
        if let (QoS::ExactlyOnce, Some(pid)) = (qos, packet_id) {
            self.qos2_storing.remove(&pid.get());
        }
    }

    /// The QoS 2 PUBLISH with `pid` is being appended.
    pub fn storing_qos2(&mut self, pid: PacketId) {
        self.qos2_storing.insert(pid.get());
    }

    /// A re-sent QoS 2 PUBLISH of a restored session was found in the log (stored before a
    /// crash): received, its PUBREC waits for the next save like any other.
    pub fn found_stored_qos2(&mut self, pid: PacketId) {
        self.changed = true;
        self.state.inbound_qos2.insert(pid.get());
        self.pubrec_waiting.push(PubResponse::new(pid));
    }

    /// The core service answered an append (`persistent`: the session outlives the
    /// connection, so a QoS 2 packet identifier must be saved before its PUBREC).
    pub fn on_appended(&mut self, a: Appended, persistent: bool) -> AppendStep {
        // QoS 2 counts against the Receive Maximum until its PUBREL, unless it failed.
        if a.qos != QoS::ExactlyOnce || a.outcome.is_err() || a.packet_id.is_none() {
            self.end_receive(a.qos);
        }
        if let (QoS::ExactlyOnce, Some(pid)) = (a.qos, a.packet_id) {
            self.qos2_storing.remove(&pid.get());
        }
        match (a.outcome, a.qos, a.packet_id) {
            (Err(e), QoS::AtMostOnce, _) => AppendStep::LostQos0(e),
            (Err(e), _, _) => AppendStep::Failed(e),
            (Ok(()), QoS::AtLeastOnce, Some(pid)) => AppendStep::Stored {
                reply: Some(Packet::PubAck(self.ack_with_id(pid, a.msg_id.as_deref()))),
                changed: false,
            },
            (Ok(()), QoS::ExactlyOnce, Some(pid)) => {
                self.state.qos2_intents.remove(&pid.get());
                self.state.inbound_qos2.insert(pid.get());
                self.changed = true;
                let rec = self.ack_with_id(pid, a.msg_id.as_deref());
                let reply = if persistent {
                    self.pubrec_waiting.push(rec);
                    None
                } else {
                    // No session outlives the connection: nothing to recognise a re-send by.
                    Some(Packet::PubRec(rec))
                };
                AppendStep::Stored { reply, changed: true }
            }
            (Ok(()), _, _) => AppendStep::Stored { reply: None, changed: false },
        }
    }

    /// When the next save of a persistent session is due, given the last one and the
    /// checkpoint interval: `None` when there is nothing to save; at once for PUBRECs held
    /// for it and for changes that do not wait (a new session, a subscription change).
    pub fn save_due<T: Copy + std::ops::Add<std::time::Duration, Output = T>>(
        &self,
        last: T,
        every: std::time::Duration,
    ) -> Option<T> {
        if !self.changed || !self.persistent() {
            return None;
        }
        Some(if self.pubrec_waiting.is_empty() && !self.save_soon { last + every } else { last })
    }

    /// A session save starts with the state as it is now: unchanged since, and the PUBRECs
    /// waiting go out when it lands.
    pub fn saving(&mut self) {
        self.changed = false;
        self.save_soon = false;
        self.pubrec_saving.append(&mut self.pubrec_waiting);
    }

    /// The save in flight landed (`true`) or failed: the PUBRECs to send now (none on
    /// failure: they wait for the next save).
    pub fn on_saved(&mut self, ok: bool) -> Vec<Packet> {
        if ok {
            return std::mem::take(&mut self.pubrec_saving).into_iter().map(Packet::PubRec).collect();
        }
        let saving = std::mem::take(&mut self.pubrec_saving);
        self.pubrec_waiting.extend(saving);
        self.changed = true;
        Vec::new()
    }

    /// A positive PUBACK / PUBREC; MQTT 5 gets the message ID as user property `msgId`.
    fn ack_with_id(&self, pid: PacketId, msg_id: Option<&str>) -> PubResponse {
        let mut ack = PubResponse::new(pid);
        if let (Protocol::V5, Some(id)) = (self.protocol, msg_id.filter(|id| !id.is_empty())) {
            ack.properties.user_properties.push((crate::msgid::HEADER.to_string(), id.to_string()));
        }
        ack
    }
}

/// SUBSCRIBE and UNSUBSCRIBE: what the session records once the driver has checked a filter
/// (syntax, limits, rights) and the router has taken it.
impl Session {
    /// Whether the session holds a subscription to exactly `filter` (replacing it costs no
    /// quota, and `retain_handling` 1 sends no retained messages for it).
    pub fn holds(&self, filter: &str) -> bool {
        self.state.subscription(filter).is_some()
    }

    /// The router took the subscription to `filter` (`positions`: where the session starts
    /// reading each partition it did not read yet). Returns whether the retained messages
    /// matching it are to be sent: by its Retain Handling [MQTT-3.3.1-9, 3.3.1-10,
    /// 3.3.1-11], and never for a shared subscription.
    pub fn subscribed(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
        positions: impl IntoIterator<Item = (TopicPartition, u64)>,
    ) -> bool {
        let existed = self.holds(filter);
        for (tp, live) in positions {
            self.state.cursor(&tp, live);
        }
        self.state.subscribe(Subscription { filter: filter.to_string(), options, identifier });
        self.changed = true;
        self.save_soon = true;
        let shared = filter.starts_with("$share/");
        !shared
            && match options.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscription => !existed,
                RetainHandling::Never => false,
            }
    }

    /// Remove the subscription to `filter`: the UNSUBACK code for it.
    pub fn unsubscribe(&mut self, filter: &str) -> ReasonCode {
        self.changed = true;
        self.save_soon = true;
        if self.state.unsubscribe(filter) {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::NO_SUBSCRIPTION_EXISTED
        }
    }
}

/// How a connection ended, as far as its will goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent DISCONNECT (`with_will`: with reason code 0x04).
    Disconnect { with_will: bool },
    /// Another connection took the session over (`new_clean_start`: it starts a new session).
    TakenOver { new_clean_start: bool },
    /// Anything else: the network, a protocol error, the keepalive, a slow reader, a kick, a
    /// shutdown.
    Lost,
}

/// Whether the will is published when a connection ends so, and after how many seconds.
/// A normal DISCONNECT discards it [MQTT-3.1.2-10]; a takeover by a connection that resumes
/// the session sends it only if it is not delayed (the resumed session is there before the
/// delay ends, MQTT 5 §3.1.3.2.2); otherwise it goes after its Will Delay Interval, at most
/// the session expiry interval [MQTT-3.1.3-9].
pub fn will_delay(ending: Ending, will: &LastWill, session_expiry: u32) -> Option<u32> {
    let delay = will.properties.will_delay_interval.unwrap_or(0);
    match ending {
        Ending::Disconnect { with_will: false } => None,
        Ending::TakenOver { new_clean_start: false } if delay > 0 => None,
        _ => Some(delay.min(session_expiry)),
    }
}

/// The distinct filters of one SUBSCRIBE. A filter repeated inside it is one subscription:
/// the last copy's options win (a repeated subscription replaces the earlier one
/// [MQTT-3.8.4-3]), and No Local counts if any copy set it (it is refused on a shared
/// subscription). Each distinct filter is checked, counted and sent its retained messages
/// once, and every copy gets its code in the SUBACK: the work per SUBSCRIBE is bounded by
/// its distinct filters, not by how often a client repeats one.
pub struct SubscribePlan {
    /// Filter, options (of its last copy), whether any copy set No Local.
    pub distinct: Vec<(String, SubscriptionOptions, bool)>,
    /// For each filter of the packet, in order, its index in `distinct`.
    copies: Vec<usize>,
}

impl SubscribePlan {
    pub fn new(s: &Subscribe) -> SubscribePlan {
        let mut distinct: Vec<(String, SubscriptionOptions, bool)> = Vec::new();
        let mut index_of: HashMap<&str, usize> = HashMap::new();
        let mut copies = Vec::with_capacity(s.filters.len());
        for (filter, options) in &s.filters {
            let i = *index_of.entry(filter.as_str()).or_insert_with(|| {
                distinct.push((filter.clone(), *options, false));
                distinct.len() - 1
            });
            if let Some(d) = distinct.get_mut(i) {
                d.1 = *options;
                d.2 |= options.no_local;
            }
            copies.push(i);
        }
        SubscribePlan { distinct, copies }
    }

    /// The SUBACK's codes, one per filter of the packet, from the codes of the distinct
    /// filters (in `distinct` order).
    pub fn codes(&self, distinct_codes: &[ReasonCode]) -> Vec<ReasonCode> {
        self.copies.iter().map(|&i| distinct_codes.get(i).copied().unwrap_or(ReasonCode::UNSPECIFIED_ERROR)).collect()
    }
}

/// The PUBLISH that delivers `o` (`dup`: a resend; never set for QoS 0).
pub fn publish_packet(
    o: &Outbound,
    packet_id: Option<PacketId>,
    dup: bool,
    protocol: Protocol,
    now_ms: i64,
) -> Publish {
    let mut properties =
        if protocol == Protocol::V5 { o.message.publish_properties(now_ms) } else { PublishProperties::default() };
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

/// Topic aliases the gateway assigns towards one MQTT 5 client: at most the Topic Alias
/// Maximum the client announced (and `mqtt.topic_alias_max`), the least recently used one
/// re-assigned when all are taken. Per connection: a new connection starts with none.
struct OutAliases {
    max: u16,
    /// Topic, alias, last use.
    entries: Vec<(Arc<str>, u16, u64)>,
    clock: u64,
}

impl OutAliases {
    fn new(max: u16) -> OutAliases {
        OutAliases { max, entries: Vec::new(), clock: 0 }
    }

    /// The alias to send `topic` with, and whether the client knows it already (then the
    /// topic name is left out); a new mapping only when `may_add`.
    fn alias(&mut self, topic: &Arc<str>, may_add: bool) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| *e.0 == **topic) {
            e.2 = self.clock;
            return Some((e.1, true));
        }
        if !may_add {
            return None;
        }
        if self.entries.len() < usize::from(self.max) {
            let alias = u16::try_from(self.entries.len() + 1).ok()?;
            self.entries.push((topic.clone(), alias, self.clock));
            return Some((alias, false));
        }
        let lru = self.entries.iter_mut().min_by_key(|e| e.2)?;
        *lru = (topic.clone(), lru.1, self.clock);
        Some((lru.1, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TopicPartition;
    use crate::protocol::{PacketId, QoS};

    fn pid(n: u16) -> PacketId {
        PacketId::new(n).expect("non-zero")
    }

    fn tp() -> TopicPartition {
        TopicPartition::new(Arc::from("t"), 0)
    }

    /// A session with `n` messages in flight at `qos`, from offsets 0.. of one partition.
    fn session_on(protocol: Protocol, n: u16, qos: QoS) -> Session {
        let mut s = SessionState::new("c".into());
        let cursor = s.cursor(&tp(), 0);
        cursor.next = u64::from(n);
        cursor.pending = (0..u64::from(n)).collect();
        for i in 1..=n {
            let o = Outbound {
                message: Arc::new(Message { topic: format!("t/{i}").as_str().into(), ..Message::default() }),
                qos,
                retain: false,
                subscription_ids: Vec::new(),
                origin: Some(Origin { tp: tp(), offset: u64::from(i) - 1 }),
                stage: OutboundStage::Published,
            };
            s.outbound.insert(pid(i), o);
        }
        Session::new(s, protocol, Limits { window: 64, ..limits(64) })
    }

    fn session(n: u16, qos: QoS) -> Session {
        session_on(Protocol::V5, n, qos)
    }

    fn resp(n: u16) -> PubResponse {
        PubResponse::new(pid(n))
    }

    #[test]
    fn puback_completes_a_qos1_delivery_and_moves_the_read_position() {
        let mut s = session(2, QoS::AtLeastOnce);
        let step = s.on_client_ack(ClientAck::PubAck(resp(1)));
        assert!(step.changed && step.reply.is_none());
        assert_eq!(
            step.acked.map(|(m, how)| (m.topic.to_string(), how)),
            Some(("t/1".into(), Acked::PubAck(ReasonCode::SUCCESS)))
        );
        assert!(!s.state.outbound.contains_key(&pid(1)) && s.state.outbound.contains_key(&pid(2)));
        assert_eq!(s.state.cursors[&tp()].committed(), 1, "offset 0 acknowledged: reading resumes at 1");
        // The same PUBACK again, or one for an id never used: nothing happens.
        for n in [1, 9] {
            let again = s.on_client_ack(ClientAck::PubAck(resp(n)));
            assert!(!again.changed && again.acked.is_none() && again.reply.is_none());
        }
    }

    #[test]
    fn acknowledgements_out_of_order_are_remembered_above_the_oldest_unacknowledged() {
        let mut s = session(3, QoS::AtLeastOnce);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(3))).acked_above, 1);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(2))).acked_above, 2);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(1))).acked_above, 0);
        assert_eq!(s.state.cursors[&tp()].committed(), 3);
    }

    #[test]
    fn qos2_delivery_is_pubrec_then_pubrel_then_pubcomp() {
        let mut s = session(1, QoS::ExactlyOnce);
        let rec = s.on_client_ack(ClientAck::PubRec(resp(1)));
        assert!(
            matches!(rec.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS && r.packet_id == pid(1))
        );
        assert!(matches!(rec.acked, Some((_, Acked::PubRec))));
        assert_eq!(s.state.outbound[&pid(1)].stage, OutboundStage::Released, "kept until PUBCOMP");
        assert_eq!(s.state.cursors[&tp()].committed(), 1, "PUBREC hands the message over");
        // A repeated PUBREC (the client did not get our PUBREL) is answered again.
        let again = s.on_client_ack(ClientAck::PubRec(resp(1)));
        assert!(matches!(again.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS));
        let comp = s.on_client_ack(ClientAck::PubComp(resp(1)));
        assert!(comp.changed && comp.reply.is_none() && s.state.outbound.is_empty());
        assert!(!s.on_client_ack(ClientAck::PubComp(resp(1))).changed);
    }

    #[test]
    fn pubrec_with_an_error_code_ends_the_delivery_without_pubrel() {
        let mut s = session(1, QoS::ExactlyOnce);
        let mut r = resp(1);
        r.code = ReasonCode(0x80);
        let step = s.on_client_ack(ClientAck::PubRec(r));
        assert!(step.reply.is_none() && step.changed && s.state.outbound.is_empty());
        assert_eq!(s.state.cursors[&tp()].committed(), 1);
    }

    #[test]
    fn unknown_packet_ids_get_0x92_on_mqtt5_and_a_plain_answer_on_311() {
        let mut s = session_on(Protocol::V5, 0, QoS::ExactlyOnce);
        let mut s311 = session_on(Protocol::V311, 0, QoS::ExactlyOnce);
        let v5 = s.on_client_ack(ClientAck::PubRec(resp(7)));
        assert!(matches!(v5.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND));
        assert!(!v5.changed);
        let v311 = s311.on_client_ack(ClientAck::PubRec(resp(7)));
        assert!(matches!(v311.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS));
        let rel5 = s.on_client_ack(ClientAck::PubRel(resp(7)));
        assert!(
            matches!(rel5.reply, Some(Packet::PubComp(ref r)) if r.code == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
        );
        assert!(!rel5.inbound_done && !rel5.changed);
        let rel311 = s311.on_client_ack(ClientAck::PubRel(resp(7)));
        assert!(matches!(rel311.reply, Some(Packet::PubComp(ref r)) if r.code == ReasonCode::SUCCESS));
    }

    proptest::proptest! {
        /// Any order of PUBACKs (repeats and unknown ids included) against a model: the set
        /// of messages not yet acknowledged. The session keeps exactly those in flight, its
        /// read position is the oldest of them, and it reports how many acknowledgements it
        /// keeps above that one.
        #[test]
        fn pubacks_in_any_order_match_the_model(
            n in 1u16..40,
            acks in proptest::collection::vec(1u16..45, 0..80),
        ) {
            let mut s = session(n, QoS::AtLeastOnce);
            let mut unacked: std::collections::BTreeSet<u64> = (0..u64::from(n)).collect();
            for k in acks {
                let step = s.on_client_ack(ClientAck::PubAck(resp(k)));
                let offset = u64::from(k) - 1;
                let known = unacked.remove(&offset);
                proptest::prop_assert_eq!(step.changed, known);
                proptest::prop_assert!(step.reply.is_none());
                let low = unacked.first().copied().unwrap_or(u64::from(n));
                let above = (low + 1..u64::from(n)).filter(|o| !unacked.contains(o)).count();
                if known {
                    proptest::prop_assert_eq!(step.acked_above, above);
                }
                proptest::prop_assert_eq!(s.state.cursors[&tp()].committed(), low);
                let in_flight: std::collections::BTreeSet<u64> =
                    s.state.outbound.keys().map(|p| u64::from(p.get()) - 1).collect();
                proptest::prop_assert_eq!(&in_flight, &unacked);
            }
        }
    }

    #[test]
    fn pubrel_completes_a_received_qos2_message_once() {
        let mut s = session(0, QoS::ExactlyOnce);
        s.state.inbound_qos2.insert(5);
        let step = s.on_client_ack(ClientAck::PubRel(resp(5)));
        assert!(step.inbound_done && step.changed && s.state.inbound_qos2.is_empty());
        assert!(
            matches!(step.reply, Some(Packet::PubComp(ref r)) if r.code == ReasonCode::SUCCESS && r.packet_id == pid(5))
        );
        let again = s.on_client_ack(ClientAck::PubRel(resp(5)));
        assert!(!again.inbound_done, "a repeated PUBREL frees no second slot");
    }

    // ---- deliveries into the window ----

    const NOW: i64 = 1_000_000;

    /// A session subscribed to `t/#` at `qos`, with the given limits.
    fn subscribed(protocol: Protocol, qos: QoS, limits: Limits) -> Session {
        let mut st = SessionState::new("c".into());
        st.subscribe(crate::session::state::Subscription {
            filter: "t/#".into(),
            options: crate::protocol::SubscriptionOptions { qos, ..Default::default() },
            identifier: Some(7),
        });
        Session::new(st, protocol, limits)
    }

    fn limits(window: usize) -> Limits {
        Limits { window, client_max_packet: None, topic_alias_max: 0, client_alias_max: 4, receive_maximum: 3 }
    }

    fn msg(topic: &str, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            qos,
            payload: bytes::Bytes::from_static(b"hello"),
            timestamp_ms: NOW,
            ..Message::default()
        })
    }

    /// Drain what the session will send now: (topic as sent, packet id, qos) of each PUBLISH.
    fn drain(s: &mut Session, now: i64) -> Vec<Next> {
        std::iter::from_fn(|| s.next_publish(now)).collect()
    }

    fn sent(next: &Next) -> (String, Option<u16>, QoS, Option<u16>) {
        match next {
            Next::Send { packet: Packet::Publish(p), packet_id, qos, .. } => {
                assert_eq!(p.packet_id, *packet_id);
                assert_eq!(p.qos, *qos);
                assert!(!p.dup, "a first delivery is not a duplicate");
                (p.topic.clone(), packet_id.map(|p| p.get()), p.qos, p.properties.topic_alias)
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    #[test]
    fn qos1_deliveries_fill_the_window_then_wait_for_acknowledgements() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(2));
        for offset in 0..3 {
            assert!(s.consider(&tp(), offset, msg(&format!("t/{offset}"), QoS::AtLeastOnce), None, NOW));
        }
        let first = drain(&mut s, NOW);
        assert_eq!(
            first.iter().map(sent).collect::<Vec<_>>(),
            vec![("t/0".into(), Some(1), QoS::AtLeastOnce, None), ("t/1".into(), Some(2), QoS::AtLeastOnce, None)],
            "two in flight, the third waits"
        );
        assert_eq!(s.queued(), 1);
        assert_eq!(s.state.cursors[&tp()].committed(), 0, "nothing acknowledged: the position stays");
        let step = s.on_client_ack(ClientAck::PubAck(resp(1)));
        assert!(step.changed);
        assert_eq!(s.state.cursors[&tp()].committed(), 1);
        let rest = drain(&mut s, NOW);
        assert_eq!(rest.iter().map(sent).collect::<Vec<_>>(), vec![("t/2".into(), Some(3), QoS::AtLeastOnce, None)]);
        // The subscription identifier goes with every PUBLISH to an MQTT 5 client.
        let Next::Send { packet: Packet::Publish(p), .. } = &rest[0] else { unreachable!() };
        assert_eq!(p.properties.subscription_identifiers, vec![7]);
    }

    #[test]
    fn qos0_is_granted_the_lower_qos_and_needs_no_window() {
        let mut s = subscribed(Protocol::V311, QoS::AtMostOnce, limits(1));
        for offset in 0..5 {
            s.consider(&tp(), offset, msg("t/a", QoS::ExactlyOnce), None, NOW);
        }
        let out = drain(&mut s, NOW);
        assert_eq!(out.len(), 5, "QoS 0 is not held by the window");
        assert!(out.iter().map(sent).all(|(_, pid, qos, _)| pid.is_none() && qos == QoS::AtMostOnce));
        assert!(s.state.outbound.is_empty());
        assert_eq!(s.state.cursors[&tp()].committed(), 5, "QoS 0 leaves nothing pending");
    }

    #[test]
    fn records_below_the_position_or_seen_already_are_not_delivered_again() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(10));
        assert!(s.consider(&tp(), 4, msg("t/a", QoS::AtLeastOnce), None, NOW));
        assert!(!s.consider(&tp(), 4, msg("t/a", QoS::AtLeastOnce), None, NOW), "same offset twice");
        assert!(!s.consider(&tp(), 3, msg("t/a", QoS::AtLeastOnce), None, NOW), "below the position");
        assert!(!s.consider(&tp(), 5, msg("other", QoS::AtLeastOnce), None, NOW), "no matching subscription");
        assert_eq!(s.state.cursors[&tp()].next, 6, "the position moves past what does not match");
        assert_eq!(drain(&mut s, NOW).len(), 1);
    }

    #[test]
    fn a_message_that_expires_while_queued_is_dropped_and_its_position_moves_on() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(10));
        let expiring =
            Arc::new(Message { message_expiry_interval: Some(10), ..(*msg("t/a", QoS::AtLeastOnce)).clone() });
        assert!(s.consider(&tp(), 0, expiring.clone(), None, NOW));
        assert!(!s.consider(&tp(), 1, expiring, None, NOW + 10_000), "expired already: not queued");
        let out = drain(&mut s, NOW + 10_000);
        assert!(matches!(out[..], [Next::Dropped { why: Dropped::Expired, .. }]), "{out:?}");
        assert!(s.state.outbound.is_empty());
        assert_eq!(s.state.cursors[&tp()].committed(), 2);
        // Not yet expired: the expiry interval sent is what is left of it.
        s.consider(
            &tp(),
            2,
            Arc::new(Message { message_expiry_interval: Some(10), ..(*msg("t/a", QoS::AtLeastOnce)).clone() }),
            None,
            NOW,
        );
        let Some(Next::Send { packet: Packet::Publish(p), .. }) = s.next_publish(NOW + 4_000) else { panic!() };
        assert_eq!(p.properties.message_expiry_interval, Some(6));
    }

    #[test]
    fn a_message_larger_than_the_clients_maximum_packet_is_dropped_as_if_delivered() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, Limits { client_max_packet: Some(40), ..limits(10) });
        let big = Arc::new(Message { payload: vec![0u8; 100].into(), ..(*msg("t/a", QoS::AtLeastOnce)).clone() });
        s.consider(&tp(), 0, big, None, NOW);
        s.consider(&tp(), 1, msg("t/b", QoS::AtLeastOnce), None, NOW);
        let out = drain(&mut s, NOW);
        assert!(matches!(out[0], Next::Dropped { why: Dropped::TooLarge(len), .. } if len > 100), "{out:?}");
        assert_eq!(sent(&out[1]).0, "t/b");
        let Next::Send { len, .. } = out[1] else { unreachable!() };
        assert!(len <= 40);
        assert_eq!(s.state.outbound.len(), 1, "the dropped one takes no slot of the window");
    }

    #[test]
    fn topic_aliases_replace_topics_the_client_knows_least_recently_used_reassigned() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, Limits { topic_alias_max: 2, ..limits(10) });
        for (offset, topic) in ["t/a", "t/a", "t/b", "t/c", "t/b", "t/a"].iter().enumerate() {
            s.consider(&tp(), offset as u64, msg(topic, QoS::AtMostOnce), None, NOW);
        }
        let out: Vec<(String, Option<u16>)> = drain(&mut s, NOW).iter().map(sent).map(|(t, _, _, a)| (t, a)).collect();
        assert_eq!(
            out,
            vec![
                ("t/a".into(), Some(1)),
                (String::new(), Some(1)),
                ("t/b".into(), Some(2)),
                ("t/c".into(), Some(1)), // t/a was the least recently used
                (String::new(), Some(2)),
                ("t/a".into(), Some(1)), // t/c was
            ]
        );
        // MQTT 3.1.1 has no aliases, whatever the limit says.
        let mut v311 = subscribed(Protocol::V311, QoS::AtMostOnce, Limits { topic_alias_max: 2, ..limits(10) });
        v311.consider(&tp(), 0, msg("t/a", QoS::AtMostOnce), None, NOW);
        v311.consider(&tp(), 1, msg("t/a", QoS::AtMostOnce), None, NOW);
        assert!(drain(&mut v311, NOW).iter().map(sent).all(|(t, _, _, a)| t == "t/a" && a.is_none()));
    }

    #[test]
    fn retained_messages_for_a_subscribe_are_sent_with_retain_and_counted_until_written() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(1));
        s.queue_retained(msg("t/r1", QoS::AtLeastOnce), QoS::AtLeastOnce, vec![]);
        s.queue_retained(msg("t/r2", QoS::AtLeastOnce), QoS::AtLeastOnce, vec![]);
        assert_eq!(s.retained_waiting(), 2);
        let out = drain(&mut s, NOW);
        assert_eq!(out.len(), 1, "window of one");
        let Next::Send { packet: Packet::Publish(p), .. } = &out[0] else { panic!() };
        assert!(p.retain);
        assert_eq!(s.retained_waiting(), 1);
    }

    #[test]
    fn a_resumed_session_resends_publish_with_dup_then_pubrel_in_packet_id_order() {
        let mut s = session(3, QoS::ExactlyOnce);
        s.on_client_ack(ClientAck::PubRec(resp(2)));
        let again = s.resend_inflight(NOW);
        let summary: Vec<(u16, &str, bool)> = again
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.packet_id.map_or(0, |p| p.get()), "publish", p.dup),
                Packet::PubRel(r) => (r.packet_id.get(), "pubrel", false),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(summary, vec![(1, "publish", true), (2, "pubrel", false), (3, "publish", true)]);
    }

    proptest::proptest! {
        /// Records arrive in any interleaving with acknowledgements (some repeated, some
        /// unknown), in a window of any size. Against the model: every matching QoS 1
        /// record is sent exactly once, in offset order; no more than the window is ever
        /// in flight; and once all is acknowledged the read position is past every record.
        #[test]
        fn deliveries_and_acknowledgements_in_any_interleaving_match_the_model(
            window in 1usize..6,
            steps in proptest::collection::vec((0u8..3, 0u16..8), 1..120),
        ) {
            let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(window));
            let mut next_offset = 0u64;
            let mut sent_offsets: Vec<u64> = Vec::new();
            let mut pid_to_offset = std::collections::HashMap::new();
            for (kind, arg) in steps {
                match kind {
                    // A record arrives (half of them match), maybe delivered twice.
                    0 => {
                        let topic = if arg % 2 == 0 { "t/x" } else { "u/x" };
                        s.consider(&tp(), next_offset, msg(topic, QoS::AtLeastOnce), None, NOW);
                        if arg % 3 == 0 {
                            s.consider(&tp(), next_offset, msg(topic, QoS::AtLeastOnce), None, NOW);
                        }
                        next_offset += 1;
                    }
                    // The client acknowledges the in-flight message with the arg-th lowest id.
                    1 => {
                        let mut ids: Vec<u16> = s.state.outbound.keys().map(|p| p.get()).collect();
                        ids.sort();
                        if let Some(&id) = ids.get(usize::from(arg) % ids.len().max(1)) {
                            proptest::prop_assert!(s.on_client_ack(ClientAck::PubAck(resp(id))).changed);
                        } else {
                            proptest::prop_assert!(!s.on_client_ack(ClientAck::PubAck(resp(arg.max(1)))).changed);
                        }
                    }
                    // The driver has room.
                    _ => {}
                }
                while let Some(n) = s.next_publish(NOW) {
                    let Next::Send { packet: Packet::Publish(p), packet_id: Some(pid), .. } = n else {
                        proptest::prop_assert!(false, "only QoS 1 sends expected");
                        unreachable!()
                    };
                    let offset = s.state.outbound[&pid].origin.as_ref().map(|o| o.offset);
                    proptest::prop_assert_eq!(p.topic.as_str(), "t/x");
                    let offset = offset.expect("QoS 1 has an origin");
                    pid_to_offset.insert(pid, offset);
                    sent_offsets.push(offset);
                }
                proptest::prop_assert!(s.state.outbound.len() <= window);
            }
            let mut sorted = sent_offsets.clone();
            sorted.sort();
            sorted.dedup();
            proptest::prop_assert_eq!(&sorted, &sent_offsets, "in order, each once");
            // Acknowledge everything left, draining the queue.
            loop {
                let ids: Vec<PacketId> = s.state.outbound.keys().copied().collect();
                if ids.is_empty() && s.queued() == 0 {
                    break;
                }
                for id in ids {
                    s.on_client_ack(ClientAck::PubAck(PubResponse::new(id)));
                }
                while s.next_publish(NOW).is_some() {}
            }
            proptest::prop_assert_eq!(s.state.cursors.get(&tp()).map_or(next_offset, |c| c.committed()), next_offset);
        }
    }

    // ---- PUBLISHes from the client ----

    fn publish(topic: &str, alias: Option<u16>) -> Publish {
        let mut p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(pid(1)),
            payload: bytes::Bytes::new(),
            properties: PublishProperties::default(),
        };
        p.properties.topic_alias = alias;
        p
    }

    fn appended(qos: QoS, id: u16, outcome: Result<(), String>) -> Appended {
        Appended { packet_id: Some(pid(id)), qos, outcome, msg_id: Some("m-1".into()) }
    }

    #[test]
    fn client_topic_aliases_are_checked_and_remembered_only_when_told() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        let code = |r: Result<Option<u16>, Violation>| r.map_err(|v| v.code);
        assert_eq!(code(s.resolve_alias(&mut publish("", None))), Err(ReasonCode::PROTOCOL_ERROR));
        assert_eq!(code(s.resolve_alias(&mut publish("a", Some(0)))), Err(ReasonCode::TOPIC_ALIAS_INVALID));
        assert_eq!(code(s.resolve_alias(&mut publish("a", Some(5)))), Err(ReasonCode::TOPIC_ALIAS_INVALID), "max is 4");
        assert_eq!(code(s.resolve_alias(&mut publish("", Some(2)))), Err(ReasonCode::PROTOCOL_ERROR), "unknown");
        assert_eq!(code(s.resolve_alias(&mut publish("t/a", Some(2)))), Ok(Some(2)));
        // Not remembered until the driver says the topic passed its checks.
        assert_eq!(code(s.resolve_alias(&mut publish("", Some(2)))), Err(ReasonCode::PROTOCOL_ERROR));
        s.remember_alias(2, "t/a".into());
        let mut p = publish("", Some(2));
        assert_eq!(code(s.resolve_alias(&mut p)), Ok(None));
        assert_eq!(p.topic, "t/a");
        assert_eq!(code(s.resolve_alias(&mut publish("t/b", None))), Ok(None));
    }

    #[test]
    fn an_mqtt5_client_beyond_the_receive_maximum_breaks_the_protocol() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        for _ in 0..3 {
            assert!(s.begin_receive(QoS::AtLeastOnce).is_ok());
        }
        assert!(s.begin_receive(QoS::AtMostOnce).is_ok(), "QoS 0 does not count");
        assert_eq!(s.begin_receive(QoS::ExactlyOnce).map_err(|v| v.code), Err(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
        s.end_receive(QoS::ExactlyOnce);
        s.end_receive(QoS::AtLeastOnce);
        assert!(s.begin_receive(QoS::AtLeastOnce).is_ok(), "an acknowledged one frees its slot");
        // MQTT 3.1.1 has no Receive Maximum to break.
        let mut v311 = subscribed(Protocol::V311, QoS::AtMostOnce, limits(1));
        assert!((0..10).all(|_| v311.begin_receive(QoS::AtLeastOnce).is_ok()));
    }

    #[test]
    fn a_restored_session_counts_its_qos2_messages_waiting_for_pubrel() {
        let mut st = SessionState::new("c".into());
        st.inbound_qos2.extend([4, 5]);
        let mut s = Session::new(st, Protocol::V5, limits(1));
        assert!(s.begin_receive(QoS::ExactlyOnce).is_ok());
        assert!(s.begin_receive(QoS::ExactlyOnce).is_err(), "2 waiting + 2 new > 3");
        s.end_receive(QoS::ExactlyOnce);
        assert!(s.on_client_ack(ClientAck::PubRel(resp(4))).inbound_done);
        assert!(s.begin_receive(QoS::ExactlyOnce).is_ok(), "a PUBREL frees a slot");
    }

    #[test]
    fn qos2_from_a_client_is_stored_once_and_acknowledged_once_per_copy() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        s.begin_receive(QoS::ExactlyOnce).unwrap();
        assert!(matches!(s.on_qos2_publish(pid(9)), Qos2Publish::New));
        s.storing_qos2(pid(9));
        // Re-sent while the first copy is being stored: that copy's PUBREC answers both.
        s.begin_receive(QoS::ExactlyOnce).unwrap();
        assert!(matches!(s.on_qos2_publish(pid(9)), Qos2Publish::Duplicate { reply: None }));
        let step = s.on_appended(appended(QoS::ExactlyOnce, 9, Ok(())), false);
        let AppendStep::Stored { reply: Some(Packet::PubRec(rec)), changed: true } = step else { panic!("{step:?}") };
        assert_eq!(rec.packet_id, pid(9));
        assert_eq!(rec.properties.user_properties, vec![(crate::msgid::HEADER.to_string(), "m-1".to_string())]);
        // Re-sent after the PUBREC (lost on the way): PUBREC again, not stored again.
        s.begin_receive(QoS::ExactlyOnce).unwrap();
        assert!(matches!(s.on_qos2_publish(pid(9)), Qos2Publish::Duplicate { reply: Some(Packet::PubRec(_)) }));
        assert_eq!(s.receiving, 1, "only the first copy holds a slot, until PUBREL");
        assert!(matches!(s.on_client_ack(ClientAck::PubRel(resp(9))).reply, Some(Packet::PubComp(_))));
        assert_eq!(s.receiving, 0);
        // After PUBCOMP the packet identifier is free for a new message.
        assert!(matches!(s.on_qos2_publish(pid(9)), Qos2Publish::New));
    }

    #[test]
    fn a_persistent_sessions_pubrec_waits_until_its_packet_id_is_saved() {
        use std::time::{Duration, Instant};
        let (t0, every) = (Instant::now(), Duration::from_secs(1));
        let mut s = subscribed(Protocol::V311, QoS::AtMostOnce, limits(1)).with_lifetime(60, None);
        assert_eq!(s.save_due(t0, every), None, "unchanged: nothing to save");
        s.begin_receive(QoS::ExactlyOnce).unwrap();
        s.storing_qos2(pid(3));
        let step = s.on_appended(appended(QoS::ExactlyOnce, 3, Ok(())), true);
        assert!(matches!(step, AppendStep::Stored { reply: None, changed: true }), "{step:?}");
        assert_eq!(s.save_due(t0, every), Some(t0), "a PUBREC waits: the save is due at once");
        // A re-send meanwhile is not answered: the PUBREC is on its way.
        assert!(matches!(s.on_qos2_publish(pid(3)), Qos2Publish::Duplicate { reply: None }));
        s.saving();
        assert_eq!(s.save_due(t0, every), None, "saved as it is now");
        assert!(s.on_saved(false).is_empty(), "the save failed: nothing goes out");
        assert_eq!(s.save_due(t0, every), Some(t0), "and the PUBREC waits for the next save, due at once");
        s.saving();
        let sent = s.on_saved(true);
        assert!(
            matches!(&sent[..], [Packet::PubRec(r)] if r.packet_id == pid(3) && r.properties.user_properties.is_empty())
        );
        assert!(s.on_saved(true).is_empty(), "sent once");
        // An acknowledgement changes the session: saved at the next checkpoint, not at once.
        s.on_client_ack(ClientAck::PubRel(resp(3)));
        assert_eq!(s.save_due(t0, every), Some(t0 + every));
        // A session that ends with the connection is never saved.
        let mut gone = subscribed(Protocol::V311, QoS::AtMostOnce, limits(1));
        gone.unsubscribe("t/#");
        assert_eq!(gone.save_due(t0, every), None);
    }

    #[test]
    fn appends_that_fail_are_never_acknowledged_and_free_their_slot() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        s.begin_receive(QoS::AtLeastOnce).unwrap();
        assert!(matches!(
            s.on_appended(appended(QoS::AtLeastOnce, 1, Err("down".into())), false),
            AppendStep::Failed(_)
        ));
        assert!(matches!(
            s.on_appended(appended(QoS::AtMostOnce, 1, Err("down".into())), false),
            AppendStep::LostQos0(_)
        ));
        s.begin_receive(QoS::ExactlyOnce).unwrap();
        s.storing_qos2(pid(2));
        assert!(matches!(
            s.on_appended(appended(QoS::ExactlyOnce, 2, Err("down".into())), true),
            AppendStep::Failed(_)
        ));
        assert_eq!(s.receiving, 0);
        assert!(matches!(s.on_qos2_publish(pid(2)), Qos2Publish::New), "not stored: a re-send is new");
        let ok = s.on_appended(appended(QoS::AtLeastOnce, 4, Ok(())), false);
        assert!(
            matches!(ok, AppendStep::Stored { reply: Some(Packet::PubAck(ref a)), changed: false } if a.packet_id == pid(4))
        );
    }

    // ---- SUBSCRIBE / UNSUBSCRIBE ----

    fn options(qos: QoS, no_local: bool, retain_handling: RetainHandling) -> SubscriptionOptions {
        SubscriptionOptions { qos, no_local, retain_as_published: false, retain_handling }
    }

    #[test]
    fn a_filter_repeated_in_one_subscribe_is_one_subscription_with_the_last_options() {
        let sub = Subscribe {
            packet_id: pid(1),
            filters: vec![
                ("a/#".into(), options(QoS::AtMostOnce, true, RetainHandling::OnSubscribe)),
                ("b".into(), options(QoS::AtLeastOnce, false, RetainHandling::OnSubscribe)),
                ("a/#".into(), options(QoS::ExactlyOnce, false, RetainHandling::Never)),
            ],
            properties: Default::default(),
        };
        let plan = SubscribePlan::new(&sub);
        assert_eq!(plan.distinct.len(), 2);
        assert_eq!(plan.distinct[0].0, "a/#");
        assert_eq!(plan.distinct[0].1.qos, QoS::ExactlyOnce, "the last copy's options");
        assert!(plan.distinct[0].2, "No Local set by any copy");
        let granted = [ReasonCode(2), ReasonCode::NOT_AUTHORIZED];
        assert_eq!(plan.codes(&granted), vec![ReasonCode(2), ReasonCode::NOT_AUTHORIZED, ReasonCode(2)]);
        assert_eq!(plan.codes(&granted[..1])[1], ReasonCode::UNSPECIFIED_ERROR, "a missing code is an error");
    }

    #[test]
    fn retained_messages_follow_retain_handling_and_never_go_to_shared_subscriptions() {
        let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        let at = |o| vec![(TopicPartition::new(Arc::from("core"), 0), o)];
        assert!(s.subscribed("x/#", options(QoS::AtLeastOnce, false, RetainHandling::OnSubscribe), Some(3), at(10)));
        assert!(s.subscribed("x/#", options(QoS::AtLeastOnce, false, RetainHandling::OnSubscribe), None, at(99)));
        assert!(s.subscribed("y", options(QoS::AtMostOnce, false, RetainHandling::OnNewSubscription), None, at(99)));
        assert!(!s.subscribed("y", options(QoS::AtMostOnce, false, RetainHandling::OnNewSubscription), None, at(99)));
        assert!(!s.subscribed("z", options(QoS::AtMostOnce, false, RetainHandling::Never), None, at(99)));
        assert!(!s.subscribed(
            "$share/g/x",
            options(QoS::AtMostOnce, false, RetainHandling::OnSubscribe),
            None,
            at(99)
        ));
        // A partition's read position is set by the first subscription that reads it.
        assert_eq!(s.state.cursors[&TopicPartition::new(Arc::from("core"), 0)].next, 10);
        // Re-subscribing replaces the options and the identifier.
        assert_eq!(s.state.subscription("x/#").map(|x| x.identifier), Some(None));
        assert!(s.holds("y") && !s.holds("y/#"));
        assert_eq!(s.unsubscribe("y"), ReasonCode::SUCCESS);
        assert_eq!(s.unsubscribe("y"), ReasonCode::NO_SUBSCRIPTION_EXISTED);
        assert!(!s.holds("y"));
    }

    // ---- will ----

    #[test]
    fn the_will_goes_unless_disconnected_normally_or_resumed_before_its_delay() {
        let will = |delay: Option<u32>| LastWill {
            topic: "w".into(),
            payload: bytes::Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: crate::protocol::WillProperties { will_delay_interval: delay, ..Default::default() },
        };
        let (now, later) = (will(None), will(Some(30)));
        assert_eq!(will_delay(Ending::Disconnect { with_will: false }, &now, 100), None);
        assert_eq!(will_delay(Ending::Disconnect { with_will: true }, &later, 100), Some(30));
        assert_eq!(will_delay(Ending::Lost, &now, 100), Some(0));
        assert_eq!(will_delay(Ending::Lost, &later, 10), Some(10), "at most the session expiry");
        assert_eq!(will_delay(Ending::Lost, &later, 0), Some(0), "no session to wait for");
        assert_eq!(will_delay(Ending::TakenOver { new_clean_start: false }, &later, 100), None, "resumed in time");
        assert_eq!(will_delay(Ending::TakenOver { new_clean_start: false }, &now, 100), Some(0));
        assert_eq!(will_delay(Ending::TakenOver { new_clean_start: true }, &later, 100), Some(30));
    }

    proptest::proptest! {
        /// QoS 2 from a client, exactly once: PUBLISHes (first copies and re-sends), append
        /// results, session saves and PUBRELs in any order, for a persistent session or not.
        /// Against a model of each packet identifier: a message is stored at most once
        /// between its first PUBLISH and its PUBREL; a PUBREC goes out only for a stored
        /// message (and, persistent, only after a save that followed the append); PUBREL is
        /// answered with a successful PUBCOMP exactly when a stored message waited for it;
        /// and the Receive Maximum counts exactly the messages between first PUBLISH and
        /// PUBREL.
        #[test]
        fn qos2_from_a_client_is_stored_once_in_any_interleaving(
            persistent in proptest::bool::ANY,
            steps in proptest::collection::vec((0u8..4, 1u16..4), 1..150),
        ) {
            #[derive(Clone, Copy, PartialEq, Debug)]
            enum M { Idle, Storing, Stored { saved: bool } }
            let limits = Limits { receive_maximum: 1000, ..limits(1) };
            let mut s = subscribed(Protocol::V5, QoS::AtMostOnce, limits);
            let mut model = [M::Idle; 4];
            let mut appending: std::collections::VecDeque<u16> = Default::default();
            let mut stores = [0u32; 4];
            let check_pubrec = |model: &[M; 4], id: u16, persistent: bool| {
                match model[usize::from(id)] {
                    M::Stored { saved } => !persistent || saved,
                    _ => false,
                }
            };
            for (op, id) in steps {
                let i = usize::from(id);
                match op {
                    0 => {
                        s.begin_receive(QoS::ExactlyOnce).unwrap();
                        match s.on_qos2_publish(pid(id)) {
                            Qos2Publish::New => {
                                proptest::prop_assert_eq!(model[i], M::Idle, "stored twice");
                                s.storing_qos2(pid(id));
                                model[i] = M::Storing;
                                appending.push_back(id);
                                stores[i] += 1;
                            }
                            Qos2Publish::Duplicate { reply } => {
                                proptest::prop_assert_ne!(model[i], M::Idle);
                                if let Some(Packet::PubRec(r)) = reply {
                                    proptest::prop_assert!(check_pubrec(&model, r.packet_id.get(), persistent));
                                }
                            }
                        }
                    }
                    1 => {
                        if let Some(done) = appending.pop_front() {
                            let step = s.on_appended(appended(QoS::ExactlyOnce, done, Ok(())), persistent);
                            model[usize::from(done)] = M::Stored { saved: false };
                            let AppendStep::Stored { reply, changed } = step else {
                                proptest::prop_assert!(false, "unexpected {:?}", step);
                                unreachable!()
                            };
                            proptest::prop_assert!(changed);
                            proptest::prop_assert_eq!(reply.is_some(), !persistent);
                        }
                    }
                    2 => {
                        s.saving();
                        for m in model.iter_mut() {
                            if let M::Stored { saved } = m {
                                *saved = true;
                            }
                        }
                        for sent in s.on_saved(true) {
                            let Packet::PubRec(r) = sent else { unreachable!() };
                            proptest::prop_assert!(check_pubrec(&model, r.packet_id.get(), persistent));
                        }
                    }
                    _ => {
                        let step = s.on_client_ack(ClientAck::PubRel(resp(id)));
                        let waited = matches!(model[i], M::Stored { .. });
                        proptest::prop_assert_eq!(step.inbound_done, waited);
                        let Some(Packet::PubComp(c)) = step.reply else { unreachable!() };
                        proptest::prop_assert_eq!(c.code == ReasonCode::SUCCESS, waited);
                        if waited {
                            model[i] = M::Idle;
                            stores[i] = 0;
                        }
                    }
                }
                let between = model.iter().filter(|m| **m != M::Idle).count();
                proptest::prop_assert_eq!(s.receiving, between);
                proptest::prop_assert!(stores.iter().all(|n| *n <= 1));
            }
        }
    }

    proptest::proptest! {
        /// QoS 2 to a client: records arrive, the client answers PUBREC and PUBCOMP in any
        /// order (some for unknown ids). Against the model: every matching record is sent
        /// once, in order; a PUBREC is answered with PUBREL and hands the message over (the
        /// read position may pass it); the message holds its slot of the window until its
        /// PUBCOMP; and once all is complete nothing is in flight and the position is past
        /// every record.
        #[test]
        fn qos2_to_a_client_in_any_interleaving_matches_the_model(
            window in 1usize..5,
            steps in proptest::collection::vec((0u8..3, 0u16..6), 1..120),
        ) {
            let mut s = subscribed(Protocol::V5, QoS::ExactlyOnce, limits(window));
            let mut next_offset = 0u64;
            let mut sent: Vec<u64> = Vec::new();
            let stage_ids = |s: &Session, stage: OutboundStage| {
                let mut ids: Vec<u16> =
                    s.state.outbound.iter().filter(|(_, o)| o.stage == stage).map(|(p, _)| p.get()).collect();
                ids.sort();
                ids
            };
            for (op, arg) in steps {
                match op {
                    0 => {
                        s.consider(&tp(), next_offset, msg("t/x", QoS::ExactlyOnce), None, NOW);
                        next_offset += 1;
                    }
                    1 => {
                        let ids = stage_ids(&s, OutboundStage::Published);
                        let id = ids.get(usize::from(arg) % ids.len().max(1)).copied().unwrap_or(arg.max(1) + 100);
                        let known = ids.contains(&id);
                        let step = s.on_client_ack(ClientAck::PubRec(resp(id)));
                        let Some(Packet::PubRel(rel)) = step.reply else { unreachable!() };
                        proptest::prop_assert_eq!(rel.code == ReasonCode::SUCCESS, known);
                        proptest::prop_assert_eq!(step.changed, known);
                    }
                    _ => {
                        let ids = stage_ids(&s, OutboundStage::Released);
                        let id = ids.get(usize::from(arg) % ids.len().max(1)).copied().unwrap_or(arg.max(1) + 100);
                        let step = s.on_client_ack(ClientAck::PubComp(resp(id)));
                        proptest::prop_assert_eq!(step.changed, ids.contains(&id));
                        proptest::prop_assert!(step.reply.is_none());
                    }
                }
                while let Some(n) = s.next_publish(NOW) {
                    let Next::Send { packet_id: Some(pid), qos: QoS::ExactlyOnce, .. } = n else {
                        proptest::prop_assert!(false, "only QoS 2 sends expected");
                        unreachable!()
                    };
                    let offset = s.state.outbound[&pid].origin.as_ref().map(|o| o.offset).expect("origin");
                    sent.push(offset);
                }
                proptest::prop_assert!(s.state.outbound.len() <= window, "a released message keeps its slot");
                // The read position never passes a message the client has not PUBRECed.
                let low_published = s
                    .state
                    .outbound
                    .values()
                    .filter(|o| o.stage == OutboundStage::Published)
                    .filter_map(|o| o.origin.as_ref().map(|o| o.offset))
                    .min();
                if let (Some(low), Some(c)) = (low_published, s.state.cursors.get(&tp())) {
                    proptest::prop_assert!(c.committed() <= low);
                }
            }
            proptest::prop_assert_eq!(sent.clone(), (0..sent.len() as u64).collect::<Vec<_>>(), "each once, in order");
            loop {
                let ids: Vec<PacketId> = s.state.outbound.keys().copied().collect();
                if ids.is_empty() && s.queued() == 0 {
                    break;
                }
                for id in ids {
                    s.on_client_ack(ClientAck::PubRec(PubResponse::new(id)));
                    s.on_client_ack(ClientAck::PubComp(PubResponse::new(id)));
                }
                while s.next_publish(NOW).is_some() {}
            }
            proptest::prop_assert_eq!(s.state.cursors.get(&tp()).map_or(next_offset, |c| c.committed()), next_offset);
        }
    }

    #[test]
    fn disconnect_may_change_the_session_expiry_but_not_raise_it_from_zero() {
        let base = || subscribed(Protocol::V5, QoS::AtMostOnce, limits(1));
        let mut zero = base().with_lifetime(0, None);
        assert!(!zero.persistent());
        assert_eq!(zero.on_disconnect_expiry(Some(60), 3600).map_err(|v| v.code), Err(ReasonCode::PROTOCOL_ERROR));
        assert!(zero.on_disconnect_expiry(Some(0), 3600).is_ok() && zero.on_disconnect_expiry(None, 3600).is_ok());
        let mut some = base().with_lifetime(30, None);
        assert!(some.persistent());
        some.on_disconnect_expiry(Some(999_999), 3600).unwrap();
        assert_eq!(some.expiry, 3600, "capped");
        some.on_disconnect_expiry(Some(0), 3600).unwrap();
        assert!(!some.persistent(), "lowered to 0: the session ends with the connection");
    }

    #[test]
    fn a_restored_session_resends_what_is_left_in_flight_and_holds_its_positions() {
        let mut s = subscribed(Protocol::V5, QoS::AtLeastOnce, limits(10));
        let inf = |packet_id: u16, offset: u64, released: bool| StoredInflight {
            packet_id,
            topic: "t".into(),
            partition: 0,
            offset,
            qos: if released { 2 } else { 1 },
            released,
        };
        let mut bodies = HashMap::new();
        bodies.insert((tp(), 3), msg("t/ok", QoS::AtLeastOnce));
        bodies.insert((tp(), 4), msg("t/forbidden", QoS::AtLeastOnce));
        // Offset 5 is gone by retention; 6 is a QoS 2 message the client received (PUBREL).
        let list = vec![inf(1, 3, false), inf(2, 4, false), inf(3, 5, false), inf(4, 6, true), inf(0, 7, false)];
        s.restore_inflight(list, bodies, |topic| topic != "t/forbidden");
        let mut ids: Vec<u16> = s.state.outbound.keys().map(|p| p.get()).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 4], "gone, forbidden and invalid ids are not resent");
        assert_eq!(s.state.outbound[&pid(4)].stage, OutboundStage::Released);
        assert_eq!(s.state.cursors[&tp()].committed(), 3, "the position waits for the resent message");
        let again = s.resend_inflight(NOW);
        assert!(
            matches!(&again[..], [Packet::Publish(p), Packet::PubRel(r)] if p.dup && p.topic == "t/ok" && r.packet_id == pid(4))
        );
    }
}
