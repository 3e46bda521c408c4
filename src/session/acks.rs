//! The client's acknowledgements — PUBACK, PUBREC, PUBCOMP for messages the session delivered,
//! PUBREL for QoS 2 messages it received — applied to the session state.
//!
//! A synchronous transition with no I/O: it says what to answer, whether the session changed
//! (to be saved at the next checkpoint), which delivered message was acknowledged (for the
//! trace) and how many acknowledgements its partition now remembers above the oldest
//! unacknowledged message (bounded by the connection). The connection sends, saves and traces.

use std::sync::Arc;

use crate::protocol::{Packet, Protocol, PubResponse, ReasonCode};
use crate::router::mapping::Message;

use super::state::{OutboundStage, SessionState};

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

impl SessionState {
    /// Apply an acknowledgement from the client. Unknown packet identifiers change nothing;
    /// MQTT 5 clients get reason code 0x92 on the PUBREL or PUBCOMP that answers them.
    pub fn on_client_ack(&mut self, ack: ClientAck, protocol: Protocol) -> AckStep {
        let mut step = AckStep::default();
        match ack {
            ClientAck::PubAck(r) => {
                if let Some(o) = self.outbound.remove(&r.packet_id) {
                    step.acked_above = self.ack_origin(&o.origin);
                    step.acked = Some((o.message, Acked::PubAck(r.code)));
                    step.changed = true;
                }
            }
            ClientAck::PubRec(r) if r.code.is_error() => {
                // The client refuses the message: it is done with, no PUBREL.
                if let Some(o) = self.outbound.remove(&r.packet_id) {
                    step.acked_above = self.ack_origin(&o.origin);
                    step.changed = true;
                }
            }
            ClientAck::PubRec(r) => {
                let pid = r.packet_id;
                let origin = match self.outbound.get_mut(&pid) {
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
                step.acked_above = self.ack_origin(&origin);
                step.changed = true;
                step.reply = Some(Packet::PubRel(PubResponse::new(pid)));
            }
            ClientAck::PubComp(r) => {
                step.changed = self.outbound.remove(&r.packet_id).is_some();
            }
            ClientAck::PubRel(r) => {
                let known = self.inbound_qos2.remove(&r.packet_id.get());
                step.changed = known;
                step.inbound_done = known;
                let mut comp = PubResponse::new(r.packet_id);
                if !known && protocol == Protocol::V5 {
                    comp.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                step.reply = Some(Packet::PubComp(comp));
            }
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TopicPartition;
    use crate::protocol::{PacketId, QoS};
    use crate::session::state::{Origin, Outbound};

    fn pid(n: u16) -> PacketId {
        PacketId::new(n).expect("non-zero")
    }

    fn tp() -> TopicPartition {
        TopicPartition::new(Arc::from("t"), 0)
    }

    /// A session with `n` messages in flight at `qos`, from offsets 0.. of one partition.
    fn session(n: u16, qos: QoS) -> SessionState {
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
        s
    }

    fn resp(n: u16) -> PubResponse {
        PubResponse::new(pid(n))
    }

    #[test]
    fn puback_completes_a_qos1_delivery_and_moves_the_read_position() {
        let mut s = session(2, QoS::AtLeastOnce);
        let step = s.on_client_ack(ClientAck::PubAck(resp(1)), Protocol::V311);
        assert!(step.changed && step.reply.is_none());
        assert_eq!(
            step.acked.map(|(m, how)| (m.topic.to_string(), how)),
            Some(("t/1".into(), Acked::PubAck(ReasonCode::SUCCESS)))
        );
        assert!(!s.outbound.contains_key(&pid(1)) && s.outbound.contains_key(&pid(2)));
        assert_eq!(s.cursors[&tp()].committed(), 1, "offset 0 acknowledged: reading resumes at 1");
        // The same PUBACK again, or one for an id never used: nothing happens.
        for n in [1, 9] {
            let again = s.on_client_ack(ClientAck::PubAck(resp(n)), Protocol::V5);
            assert!(!again.changed && again.acked.is_none() && again.reply.is_none());
        }
    }

    #[test]
    fn acknowledgements_out_of_order_are_remembered_above_the_oldest_unacknowledged() {
        let mut s = session(3, QoS::AtLeastOnce);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(3)), Protocol::V311).acked_above, 1);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(2)), Protocol::V311).acked_above, 2);
        assert_eq!(s.on_client_ack(ClientAck::PubAck(resp(1)), Protocol::V311).acked_above, 0);
        assert_eq!(s.cursors[&tp()].committed(), 3);
    }

    #[test]
    fn qos2_delivery_is_pubrec_then_pubrel_then_pubcomp() {
        let mut s = session(1, QoS::ExactlyOnce);
        let rec = s.on_client_ack(ClientAck::PubRec(resp(1)), Protocol::V5);
        assert!(
            matches!(rec.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS && r.packet_id == pid(1))
        );
        assert!(matches!(rec.acked, Some((_, Acked::PubRec))));
        assert_eq!(s.outbound[&pid(1)].stage, OutboundStage::Released, "kept until PUBCOMP");
        assert_eq!(s.cursors[&tp()].committed(), 1, "PUBREC hands the message over");
        // A repeated PUBREC (the client did not get our PUBREL) is answered again.
        let again = s.on_client_ack(ClientAck::PubRec(resp(1)), Protocol::V5);
        assert!(matches!(again.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS));
        let comp = s.on_client_ack(ClientAck::PubComp(resp(1)), Protocol::V5);
        assert!(comp.changed && comp.reply.is_none() && s.outbound.is_empty());
        assert!(!s.on_client_ack(ClientAck::PubComp(resp(1)), Protocol::V5).changed);
    }

    #[test]
    fn pubrec_with_an_error_code_ends_the_delivery_without_pubrel() {
        let mut s = session(1, QoS::ExactlyOnce);
        let mut r = resp(1);
        r.code = ReasonCode(0x80);
        let step = s.on_client_ack(ClientAck::PubRec(r), Protocol::V5);
        assert!(step.reply.is_none() && step.changed && s.outbound.is_empty());
        assert_eq!(s.cursors[&tp()].committed(), 1);
    }

    #[test]
    fn unknown_packet_ids_get_0x92_on_mqtt5_and_a_plain_answer_on_311() {
        let mut s = session(0, QoS::ExactlyOnce);
        let v5 = s.on_client_ack(ClientAck::PubRec(resp(7)), Protocol::V5);
        assert!(matches!(v5.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND));
        assert!(!v5.changed);
        let v311 = s.on_client_ack(ClientAck::PubRec(resp(7)), Protocol::V311);
        assert!(matches!(v311.reply, Some(Packet::PubRel(ref r)) if r.code == ReasonCode::SUCCESS));
        let rel5 = s.on_client_ack(ClientAck::PubRel(resp(7)), Protocol::V5);
        assert!(
            matches!(rel5.reply, Some(Packet::PubComp(ref r)) if r.code == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)
        );
        assert!(!rel5.inbound_done && !rel5.changed);
        let rel311 = s.on_client_ack(ClientAck::PubRel(resp(7)), Protocol::V311);
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
                let step = s.on_client_ack(ClientAck::PubAck(resp(k)), Protocol::V5);
                let offset = u64::from(k) - 1;
                let known = unacked.remove(&offset);
                proptest::prop_assert_eq!(step.changed, known);
                proptest::prop_assert!(step.reply.is_none());
                let low = unacked.first().copied().unwrap_or(u64::from(n));
                let above = (low + 1..u64::from(n)).filter(|o| !unacked.contains(o)).count();
                if known {
                    proptest::prop_assert_eq!(step.acked_above, above);
                }
                proptest::prop_assert_eq!(s.cursors[&tp()].committed(), low);
                let in_flight: std::collections::BTreeSet<u64> =
                    s.outbound.keys().map(|p| u64::from(p.get()) - 1).collect();
                proptest::prop_assert_eq!(&in_flight, &unacked);
            }
        }
    }

    #[test]
    fn pubrel_completes_a_received_qos2_message_once() {
        let mut s = session(0, QoS::ExactlyOnce);
        s.inbound_qos2.insert(5);
        let step = s.on_client_ack(ClientAck::PubRel(resp(5)), Protocol::V5);
        assert!(step.inbound_done && step.changed && s.inbound_qos2.is_empty());
        assert!(
            matches!(step.reply, Some(Packet::PubComp(ref r)) if r.code == ReasonCode::SUCCESS && r.packet_id == pid(5))
        );
        let again = s.on_client_ack(ClientAck::PubRel(resp(5)), Protocol::V311);
        assert!(!again.inbound_done, "a repeated PUBREL frees no second slot");
    }
}
