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
