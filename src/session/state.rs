//! Per-client session state: subscriptions, read positions in the core service, QoS 1/2
//! messages in flight in both directions. No I/O here; `connection` drives it and
//! `persist` stores it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU16;
use std::sync::Arc;

use crate::backend::TopicPartition;
use crate::protocol::{PacketId, QoS, SubscriptionOptions};
use crate::router::mapping::{p2p_target, Message};
use crate::router::topic;

/// One subscription as the client made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// As written by the client, including any `$share/<group>/` prefix.
    pub filter: String,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

impl Subscription {
    pub fn is_shared(&self) -> bool {
        self.filter.starts_with("$share/")
    }
}

/// How far the session has read one partition of the core service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Next offset to look at: everything below was delivered, skipped or is pending.
    pub next: u64,
    /// Offsets delivered at QoS 1/2 and not yet acknowledged by the client.
    pub pending: BTreeSet<u64>,
    /// Offsets above the lowest pending one that the client already acknowledged.
    pub acked: BTreeSet<u64>,
    /// Offline pull (`$SYS/getOfflineMsg`): the part of the backlog at CONNECT the client has
    /// not pulled yet, `[lo, hi)` below `next`. Not delivered unless pulled; the committed
    /// position stays at or below `lo` until it is.
    pub held: Option<Held>,
}

/// The offsets `[lo, hi)` of a partition's offline backlog that are still to be pulled:
/// requests take from `lo` (oldest first) or from `hi` (newest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub lo: u64,
    pub hi: u64,
}

impl Cursor {
    pub fn at(next: u64) -> Cursor {
        Cursor { next, ..Cursor::default() }
    }

    /// Position up to which everything is acknowledged (restart point after a crash).
    pub fn committed(&self) -> u64 {
        let low = self.pending.first().copied().unwrap_or(self.next);
        self.held.map_or(low, |h| low.min(h.lo))
    }

    /// Hold back `[lo, hi)` for pulling (the live position moves to `hi` at least).
    pub fn hold(&mut self, lo: u64, hi: u64) {
        self.next = self.next.max(hi);
        self.set_held(lo, hi);
    }

    /// What is still held after a pull; an empty range releases the hold.
    pub fn set_held(&mut self, lo: u64, hi: u64) {
        self.held = (lo < hi).then_some(Held { lo, hi });
        let low = self.committed();
        self.acked = self.acked.split_off(&low);
    }

    /// Where reading this partition back from the core service starts, when the router
    /// stopped delivering it from `lag`: never inside a held backlog, which only pulls read.
    pub fn read_from(&self, lag: u64) -> u64 {
        match self.held {
            Some(_) => self.next,
            None => self.next.min(lag),
        }
    }

    pub fn ack(&mut self, offset: u64) {
        if self.pending.remove(&offset) {
            let low = self.committed();
            if offset > low {
                self.acked.insert(offset);
            }
            // Acknowledgements below the new low-water mark need no memory.
            self.acked = self.acked.split_off(&low);
        }
    }

    /// Whether an offset in `[committed, next)` must not be delivered again.
    pub fn already_handled(&self, offset: u64) -> bool {
        offset < self.committed() || self.pending.contains(&offset) || self.acked.contains(&offset)
    }
}

/// Where an outbound message came from, so its acknowledgement moves the right cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub tp: TopicPartition,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundStage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
pub struct Outbound {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub origin: Option<Origin>,
    pub stage: OutboundStage,
}

/// A message waiting for a free slot in the in-flight window.
#[derive(Debug, Clone)]
pub struct Pending {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub origin: Option<Origin>,
    /// A retained message sent because of a SUBSCRIBE (these are bounded per connection).
    pub on_subscribe: bool,
}

/// What to deliver for a message that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub qos: QoS,
    pub subscription_ids: Vec<u32>,
    pub retain_as_published: bool,
}

/// A QoS 2 PUBLISH about to be written: its record carries `marker` (header
/// [`crate::router::mapping::header::QOS2_ID`]) and lands in core topic `topic` at or after
/// `from[p]` in partition `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qos2Intent {
    pub marker: String,
    pub topic: String,
    pub from: Vec<u64>,
}

#[derive(Debug, Default)]
pub struct SessionState {
    pub client_id: String,
    /// Who the session belongs to ([`crate::auth::Identity::owner`]); `None` for sessions
    /// stored before owners were recorded.
    pub owner: Option<String>,
    pub subscriptions: Vec<Subscription>,
    pub cursors: HashMap<TopicPartition, Cursor>,
    pub outbound: HashMap<PacketId, Outbound>,
    /// `<parent>/p2p/<ClientId>` topics reach that client only (LMQ's P2P; off with
    /// `naming: mqtt`, where they are ordinary topics).
    pub p2p: bool,
    /// QoS 2 PUBLISHes received and stored, waiting for PUBREL.
    pub inbound_qos2: BTreeSet<u16>,
    /// QoS 2 PUBLISHes of a persistent session being stored: saved with the session before
    /// the record is written, so a session restored after a crash can tell whether a re-sent
    /// PUBLISH is already in the log.
    pub qos2_intents: BTreeMap<u16, Qos2Intent>,
    next_packet_id: u16,
}

impl SessionState {
    pub fn new(client_id: String) -> SessionState {
        SessionState { client_id, next_packet_id: 1, p2p: true, ..SessionState::default() }
    }

    pub fn subscription(&self, filter: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.filter == filter)
    }

    /// Insert or replace; returns true if the filter is new.
    pub fn subscribe(&mut self, sub: Subscription) -> bool {
        match self.subscriptions.iter_mut().find(|s| s.filter == sub.filter) {
            Some(existing) => {
                *existing = sub;
                false
            }
            None => {
                self.subscriptions.push(sub);
                true
            }
        }
    }

    /// Share groups the session's subscriptions are in, counting `groups` too.
    pub fn share_groups_with<'a>(&'a self, groups: impl IntoIterator<Item = &'a str>) -> usize {
        let mut groups: Vec<&str> = self
            .subscriptions
            .iter()
            .filter_map(|s| topic::parse_filter(&s.filter).ok().and_then(|p| p.group))
            .chain(groups)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        groups.len()
    }

    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        let before = self.subscriptions.len();
        self.subscriptions.retain(|s| s.filter != filter);
        before != self.subscriptions.len()
    }

    /// Decide whether and how a message reaches this client. `shared` is the `$share`
    /// subscription the router chose this session for, if any.
    pub fn matches(&self, message: &Message, shared: Option<&str>) -> Option<Match> {
        if let Some(target) = p2p_target(&message.topic).filter(|_| self.p2p) {
            return (target == self.client_id).then(|| Match {
                qos: message.qos,
                subscription_ids: Vec::new(),
                retain_as_published: false,
            });
        }
        if let Some(f) = shared {
            let sub = self.subscription(f)?;
            return Some(Match {
                qos: message.qos.min(sub.options.qos),
                subscription_ids: sub.identifier.into_iter().collect(),
                retain_as_published: sub.options.retain_as_published,
            });
        }
        let mut best: Option<Match> = None;
        for sub in self.subscriptions.iter().filter(|s| !s.is_shared()) {
            if sub.options.no_local && *message.publisher == self.client_id {
                continue;
            }
            if !topic::matches(&sub.filter, &message.topic) {
                continue;
            }
            let m = best.get_or_insert(Match {
                qos: QoS::AtMostOnce,
                subscription_ids: Vec::new(),
                retain_as_published: false,
            });
            m.qos = m.qos.max(sub.options.qos);
            m.retain_as_published |= sub.options.retain_as_published;
            m.subscription_ids.extend(sub.identifier);
        }
        best.map(|mut m| {
            m.qos = m.qos.min(message.qos);
            m
        })
    }

    /// A packet identifier not in use by an outbound message.
    pub fn next_packet_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let id = self.next_packet_id.max(1);
            self.next_packet_id = id.wrapping_add(1);
            if let Some(pid) = NonZeroU16::new(id) {
                if !self.outbound.contains_key(&pid) {
                    return Some(pid);
                }
            }
        }
        None
    }

    /// Record that the client acknowledged (PUBACK/PUBREC) the message from `origin`;
    /// returns how many acknowledgements that partition now remembers above its oldest
    /// unacknowledged message.
    pub fn ack_origin(&mut self, origin: &Option<Origin>) -> usize {
        if let Some(o) = origin {
            if let Some(c) = self.cursors.get_mut(&o.tp) {
                c.ack(o.offset);
                return c.acked.len();
            }
        }
        0
    }

    /// Cursor for a partition, created at `start` when new.
    pub fn cursor(&mut self, tp: &TopicPartition, start: u64) -> &mut Cursor {
        self.cursors.entry(tp.clone()).or_insert_with(|| Cursor::at(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, qos: QoS, publisher: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::new(),
            qos,
            retain: false,
            publisher: publisher.into(),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
            timestamp_ms: 0,
            msg_id: None,
        }
    }

    fn sub(filter: &str, qos: QoS, id: Option<u32>) -> Subscription {
        Subscription {
            filter: filter.into(),
            options: SubscriptionOptions { qos, ..Default::default() },
            identifier: id,
        }
    }

    #[test]
    fn overlapping_subscriptions_give_max_qos_and_all_ids() {
        let mut s = SessionState::new("c1".into());
        s.subscribe(sub("a/+", QoS::AtMostOnce, Some(1)));
        s.subscribe(sub("a/#", QoS::AtLeastOnce, Some(2)));
        let m = s.matches(&msg("a/b", QoS::ExactlyOnce, "x"), None).unwrap();
        assert_eq!(m.qos, QoS::AtLeastOnce);
        assert_eq!(m.subscription_ids, vec![1, 2]);
        let m = s.matches(&msg("a/b", QoS::AtMostOnce, "x"), None).unwrap();
        assert_eq!(m.qos, QoS::AtMostOnce, "never above the published QoS");
        assert!(s.matches(&msg("b", QoS::AtMostOnce, "x"), None).is_none());
    }

    #[test]
    fn no_local_and_p2p() {
        let mut s = SessionState::new("c1".into());
        let mut nl = sub("a/#", QoS::AtLeastOnce, None);
        nl.options.no_local = true;
        s.subscribe(nl);
        assert!(s.matches(&msg("a/b", QoS::AtLeastOnce, "c1"), None).is_none());
        assert!(s.matches(&msg("a/b", QoS::AtLeastOnce, "c2"), None).is_some());
        assert!(s.matches(&msg("a/p2p/c1", QoS::AtLeastOnce, "c2"), None).is_some());
        assert!(s.matches(&msg("a/p2p/c9", QoS::AtLeastOnce, "c2"), None).is_none(), "P2P for others is not ours");
    }

    #[test]
    fn cursor_commits_only_below_the_oldest_unacked() {
        let mut c = Cursor::at(10);
        for o in 10..15 {
            c.pending.insert(o);
        }
        c.next = 15;
        assert_eq!(c.committed(), 10);
        c.ack(12);
        c.ack(13);
        assert_eq!(c.committed(), 10);
        assert!(c.already_handled(12));
        assert!(!c.already_handled(20));
        c.ack(10);
        c.ack(11);
        assert_eq!(c.committed(), 14);
        assert!(c.acked.is_empty());
        c.ack(14);
        assert_eq!(c.committed(), 15);
    }

    #[test]
    fn a_held_backlog_keeps_the_committed_position_until_pulled_and_acknowledged() {
        let mut c = Cursor::at(10);
        c.hold(10, 20);
        assert_eq!((c.next, c.committed(), c.read_from(10)), (20, 10, 20));
        // Newest first: 19 and 18 pulled, 19 acknowledged above the held rest.
        c.pending.insert(19);
        c.pending.insert(18);
        c.set_held(10, 18);
        c.ack(19);
        assert_eq!(c.committed(), 10);
        assert!(c.already_handled(19) && !c.already_handled(17));
        // The rest pulled and acknowledged: the position moves past everything.
        for o in 10..18 {
            c.pending.insert(o);
        }
        c.set_held(18, 18);
        assert_eq!(c.held, None);
        assert_eq!(c.committed(), 10);
        for o in 10..19 {
            c.ack(o);
        }
        assert_eq!(c.committed(), 20);
        assert!(c.acked.is_empty());
    }

    #[test]
    fn packet_ids_skip_those_in_use() {
        let mut s = SessionState::new("c".into());
        let a = s.next_packet_id().unwrap();
        s.outbound.insert(
            a,
            Outbound {
                message: Arc::new(msg("a", QoS::AtLeastOnce, "")),
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
                origin: None,
                stage: OutboundStage::Published,
            },
        );
        s.next_packet_id = a.get();
        assert_ne!(s.next_packet_id().unwrap(), a);
    }
}
