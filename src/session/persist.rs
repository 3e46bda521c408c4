//! What of a session is stored in the core service for persistent sessions
//! (cleanSession=0 / session expiry > 0), and its encoding (versioned JSON).
//!
//! Stored: subscriptions, per-partition committed position plus offsets acknowledged above
//! it, outbound QoS 1/2 messages in flight (by position, with their packet identifiers, so
//! they are re-sent with the same identifiers [MQTT-4.4.0-1]), inbound QoS 2 identifiers
//! awaiting PUBREL, and the expiry. Message bodies are never copied here: they stay in the
//! core service's log.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::num::NonZeroU16;

use super::state::{Cursor, Origin, OutboundStage, Qos2Intent, SessionState, Subscription};
use crate::backend::TopicPartition;
use crate::protocol::{QoS, RetainHandling, SubscriptionOptions};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub version: u32,
    pub client_id: String,
    /// The identity that created the session (SPEC §8): another identity using the same
    /// ClientId does not get it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub expiry_secs: u32,
    /// Epoch ms of the disconnect; `None` while connected.
    pub disconnected_at_ms: Option<i64>,
    pub subscriptions: Vec<StoredSubscription>,
    pub positions: Vec<StoredPosition>,
    pub inflight: Vec<StoredInflight>,
    pub inbound_qos2: Vec<u16>,
    /// QoS 2 PUBLISHes whose records were being written ([`Qos2Intent`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qos2_intents: Vec<StoredQos2Intent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredQos2Intent {
    pub packet_id: u16,
    pub marker: String,
    pub topic: String,
    pub from: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub filter: String,
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    #[serde(default)]
    pub retain_handling: u8,
    #[serde(default)]
    pub identifier: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPosition {
    pub topic: String,
    pub partition: u32,
    pub committed: u64,
    #[serde(default)]
    pub acked: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredInflight {
    pub packet_id: u16,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub qos: u8,
    /// PUBREC received, PUBREL sent: only the PUBREL is re-sent.
    pub released: bool,
}

impl Stored {
    pub const VERSION: u32 = 1;

    pub fn from_state(state: &SessionState, expiry_secs: u32, disconnected_at_ms: Option<i64>) -> Stored {
        let subscriptions = state
            .subscriptions
            .iter()
            .map(|s| StoredSubscription {
                filter: s.filter.clone(),
                qos: s.options.qos as u8,
                no_local: s.options.no_local,
                retain_as_published: s.options.retain_as_published,
                retain_handling: s.options.retain_handling as u8,
                identifier: s.identifier,
            })
            .collect();
        let mut positions: Vec<StoredPosition> = state
            .cursors
            .iter()
            .map(|(tp, c)| {
                let committed = c.committed();
                StoredPosition {
                    topic: tp.topic.to_string(),
                    partition: tp.partition,
                    committed,
                    acked: c.acked.iter().copied().filter(|o| *o >= committed).collect(),
                }
            })
            .collect();
        positions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let mut inflight: Vec<StoredInflight> = state
            .outbound
            .iter()
            .filter_map(|(pid, o)| {
                let origin = o.origin.as_ref()?;
                Some(StoredInflight {
                    packet_id: pid.get(),
                    topic: origin.tp.topic.to_string(),
                    partition: origin.tp.partition,
                    offset: origin.offset,
                    qos: o.qos as u8,
                    released: o.stage == OutboundStage::Released,
                })
            })
            .collect();
        inflight.sort_by_key(|i| (i.topic.clone(), i.partition, i.offset));
        Stored {
            version: Self::VERSION,
            client_id: state.client_id.clone(),
            owner: state.owner.clone(),
            expiry_secs,
            disconnected_at_ms,
            subscriptions,
            positions,
            inflight,
            inbound_qos2: state.inbound_qos2.iter().copied().collect(),
            qos2_intents: state
                .qos2_intents
                .iter()
                .map(|(pid, i)| StoredQos2Intent {
                    packet_id: *pid,
                    marker: i.marker.clone(),
                    topic: i.topic.clone(),
                    from: i.from.clone(),
                })
                .collect(),
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Option<Stored> {
        serde_json::from_slice::<Stored>(bytes).ok().filter(|s| s.version == Self::VERSION)
    }

    /// Whether the session has expired at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        match self.disconnected_at_ms {
            Some(t) => now_ms >= t.saturating_add(i64::from(self.expiry_secs) * 1000),
            None => false,
        }
    }

    /// Rebuild the session state; in-flight messages come back as positions to re-read
    /// (their bodies are in the log), returned separately.
    pub fn into_state(self) -> (SessionState, Vec<StoredInflight>) {
        let mut state = SessionState::new(self.client_id);
        state.owner = self.owner;
        for s in self.subscriptions {
            state.subscriptions.push(Subscription {
                filter: s.filter,
                options: SubscriptionOptions {
                    qos: QoS::from_u8(s.qos).unwrap_or(QoS::AtMostOnce),
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    retain_handling: match s.retain_handling {
                        1 => RetainHandling::OnNewSubscription,
                        2 => RetainHandling::Never,
                        _ => RetainHandling::OnSubscribe,
                    },
                },
                identifier: s.identifier,
            });
        }
        for p in self.positions {
            let tp = TopicPartition::new(p.topic, p.partition);
            let mut c = Cursor::at(p.committed);
            c.acked = p.acked.into_iter().collect();
            state.cursors.insert(tp, c);
        }
        state.inbound_qos2 = self.inbound_qos2.into_iter().collect();
        state.qos2_intents = self
            .qos2_intents
            .into_iter()
            .map(|i| (i.packet_id, Qos2Intent { marker: i.marker, topic: i.topic, from: i.from }))
            .collect();
        (state, self.inflight)
    }
}

impl StoredInflight {
    pub fn origin(&self) -> Origin {
        Origin { tp: TopicPartition::new(self.topic.clone(), self.partition), offset: self.offset }
    }

    pub fn packet_id(&self) -> Option<NonZeroU16> {
        NonZeroU16::new(self.packet_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored disconnect time at the edge of the clock (a damaged or foreign record) does
    /// not overflow: the session is simply not expired yet.
    #[test]
    fn expiry_of_a_session_disconnected_at_the_end_of_time() {
        let stored = Stored::from_state(&SessionState::new("c".into()), u32::MAX, Some(i64::MAX));
        assert!(!stored.expired(1_700_000_000_000));
        assert!(stored.expired(i64::MAX));
    }

    #[test]
    fn stored_session_round_trips() {
        let mut s = SessionState::new("GID_a@@@1".into());
        s.subscribe(Subscription {
            filter: "a/#".into(),
            options: SubscriptionOptions { qos: QoS::ExactlyOnce, no_local: true, ..Default::default() },
            identifier: Some(7),
        });
        let tp = TopicPartition::new("a", 2);
        let c = s.cursor(&tp, 5);
        c.pending.insert(5);
        c.pending.insert(6);
        c.next = 8;
        c.ack(6);
        let intent = Qos2Intent { marker: "m-1".into(), topic: "a".into(), from: vec![3, 0, 9] };
        s.qos2_intents.insert(12, intent.clone());
        let stored = Stored::from_state(&s, 3600, Some(1000));
        let back = Stored::decode(&stored.encode()).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.positions[0].committed, 5);
        assert_eq!(back.positions[0].acked, vec![6]);
        assert!(!back.expired(1000 + 3_599_000));
        assert!(back.expired(1000 + 3_600_000));
        let (state, _) = back.into_state();
        assert_eq!(state.subscriptions, s.subscriptions);
        assert!(state.cursors[&tp].already_handled(6));
        assert!(!state.cursors[&tp].already_handled(5));
        assert_eq!(state.qos2_intents.get(&12), Some(&intent));
    }
}
