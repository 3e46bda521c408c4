//! QoS 2 across a gateway crash (SPEC §8): no duplicate is stored for a PUBLISH that was
//! PUBRECed, even when the gateway process is killed with SIGKILL before the PUBREL and the
//! client sends the PUBLISH again to another process.

use super::*;
use crate::common::GatewayProcess;
use lmq_gateway::protocol::PubResponse;

fn qos2_publish(topic: &str, pid: u16, dup: bool, payload: &str) -> Packet {
    Packet::Publish(p::Publish {
        dup,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: topic.into(),
        packet_id: NonZeroU16::new(pid),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: Default::default(),
    })
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

/// QoS 2 is exactly once: a copy re-sent (DUP) while the first is still being stored is not
/// stored again, and a PUBLISH the gateway PUBRECed is recognised when re-sent after the
/// gateway process was killed with SIGKILL and another one started.
pub async fn qos2_is_stored_once_across_a_duplicate_and_a_sigkill(core: &Core) {
    let parent = unique("exactly");
    let topic = format!("{parent}/once");
    let id = unique("qos2-pub");
    let mut gw = core.process(OPEN_AUTH);

    // A persistent session (clean session 0) publishing QoS 2.
    let mut c = Raw::connect(gw.addr, Protocol::V311).await;
    c.send(&crate::common::connect_packet(&id, Protocol::V311, false)).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // The first PUBLISH and its DUP copy in one write: the copy arrives while the first is
    // being stored.
    let mut both = bytes::BytesMut::new();
    p::encode(&qos2_publish(&topic, 7, false, "dup-while-storing"), Protocol::V311, &mut both).expect("encode");
    p::encode(&qos2_publish(&topic, 7, true, "dup-while-storing"), Protocol::V311, &mut both).expect("encode");
    c.send_bytes(&both).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 7));
    c.send(&Packet::PubRel(PubResponse::new(pid(7)))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id.get() == 7));

    // PUBRECed, then the gateway dies before the PUBREL.
    c.send(&qos2_publish(&topic, 8, false, "pubreced-then-killed")).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 8));
    gw.sigkill();
    drop(c);

    // The client comes back to its session and sends the PUBLISH again (DUP), as MQTT has it.
    let gw = core.process(OPEN_AUTH);
    let mut c = Raw::connect(gw.addr, Protocol::V311).await;
    c.send(&crate::common::connect_packet(&id, Protocol::V311, false)).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.session_present), "the session survived");
    c.send(&qos2_publish(&topic, 8, true, "pubreced-then-killed")).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 8));
    c.send(&Packet::PubRel(PubResponse::new(pid(8)))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id.get() == 8));
    drop(c);
    drop(gw);

    // What the core service holds, read by a gateway started once the processes are gone.
    let gw = core.start(OPEN_AUTH).await;
    let mut stored = stored_payloads(&gw, &parent).await;
    stored.sort();
    assert_eq!(stored, vec!["dup-while-storing".to_string(), "pubreced-then-killed".to_string()], "stored once each");
    drop(gw);
}

/// Client side of pipelined QoS 2 publishing on a persistent session: which messages are
/// sent without PUBREC, PUBRECed without PUBCOMP, and complete.
struct Qos2Publisher {
    id: String,
    topic: String,
    raw: Raw,
    next: u32,
    unrec: std::collections::BTreeSet<u32>,
    released: std::collections::BTreeSet<u32>,
    complete: std::collections::BTreeSet<u32>,
}

impl Qos2Publisher {
    async fn connect(addr: SocketAddr, id: &str, resumed: bool) -> Raw {
        let mut raw = Raw::connect(addr, Protocol::V311).await;
        raw.send(&crate::common::connect_packet(id, Protocol::V311, false)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.session_present, resumed, "session present"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    fn pid(n: u32) -> NonZeroU16 {
        pid(u16::try_from(n + 1).expect("fewer than 65535 messages"))
    }

    /// Keep `window` PUBLISHes in flight until `total` are complete or `stop` says so.
    async fn run(&mut self, total: u32, window: usize, stop: impl Fn(&Self) -> bool) {
        while self.complete.len() < total as usize && !stop(self) {
            while self.next < total && self.unrec.len() + self.released.len() < window {
                let n = self.next;
                self.raw.send(&qos2_publish(&self.topic, Self::pid(n).get(), false, &n.to_string())).await;
                self.unrec.insert(n);
                self.next += 1;
            }
            match self.raw.recv().await {
                Some(Packet::PubRec(r)) => {
                    let n = u32::from(r.packet_id.get()) - 1;
                    if self.unrec.remove(&n) {
                        self.released.insert(n);
                    }
                    self.raw.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await;
                }
                Some(Packet::PubComp(r)) => {
                    let n = u32::from(r.packet_id.get()) - 1;
                    self.released.remove(&n);
                    self.complete.insert(n);
                }
                other => panic!("expected PUBREC or PUBCOMP, got {other:?}"),
            }
        }
    }

    /// Back on the session after the gateway died: re-send what has no PUBREC (DUP) and the
    /// PUBRELs of what has no PUBCOMP [MQTT-4.4.0-1].
    async fn resume(&mut self, addr: SocketAddr) {
        self.raw = Self::connect(addr, &self.id, true).await;
        for n in self.unrec.clone() {
            self.raw.send(&qos2_publish(&self.topic, Self::pid(n).get(), true, &n.to_string())).await;
        }
        for n in self.released.clone() {
            self.raw.send(&Packet::PubRel(PubResponse::new(Self::pid(n)))).await;
        }
    }
}

/// QoS 2 exactly once across a SIGKILL at any moment of a pipelined stream, PUBRECed or not:
/// a record written whose session save had not happened yet is recognised when the client
/// re-sends its PUBLISH (the QoS 2 intent), so every message is stored once.
pub async fn qos2_pipelined_is_stored_once_across_sigkills_mid_stream(core: &Core) {
    // Enough on the embedded log to hit the window between append and session save in every
    // run without the intent; fewer on the brokers, where each step costs a network round trip.
    let (total, kills): (u32, u64) = if core.is_embedded() { (3000, 6) } else { (600, 3) };
    let parent = unique("pipelined");
    let id = unique("qos2-pipe");
    let mut gw = core.process(OPEN_AUTH);
    let mut c = Qos2Publisher {
        raw: Qos2Publisher::connect(gw.addr, &id, false).await,
        id,
        topic: format!("{parent}/once"),
        next: 0,
        unrec: Default::default(),
        released: Default::default(),
        complete: Default::default(),
    };
    let mut resent = 0;
    for round in 1..=kills {
        let goal = round as usize * total as usize / (kills as usize + 2);
        c.run(total, 64, |c| c.complete.len() >= goal).await;
        // The PUBLISHes just sent are being stored now.
        tokio::time::sleep(Duration::from_micros(round * 300)).await;
        gw.sigkill();
        resent += c.unrec.len();
        gw = core.process(OPEN_AUTH);
        c.resume(gw.addr).await;
    }
    c.run(total, 64, |_| false).await;
    drop(c);
    drop(gw);
    let gw = core.start(OPEN_AUTH).await;
    let mut stored: Vec<u32> = stored_payloads(&gw, &parent).await.iter().filter_map(|p| p.parse().ok()).collect();
    stored.sort_unstable();
    let dups: Vec<u32> = stored.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    assert!(dups.is_empty(), "stored twice ({resent} re-sent after the kills): {dups:?}");
    assert_eq!(stored, (0..total).collect::<Vec<_>>(), "every message stored once");
    drop(gw);
}
