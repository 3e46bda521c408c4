//! Message trace through the admin API: a traced QoS 1 message to two subscribers shows who
//! published it, where it was stored, and each delivery and acknowledgement, in order; a
//! message of a parent topic that is not traced has no events.

use super::{api, Core, ADMIN};
use crate::common::{publish_packet, raw_connect, v4, Raw};
use crate::hostile::{unique, OPEN_AUTH};
use lmq_gateway::protocol::{self as p, Packet, Protocol};
use serde_json::Value;
use std::time::Duration;

async fn publish_v5(c: &mut Raw, topic: &str, payload: &[u8]) -> String {
    c.send(&publish_packet(1, topic, p::QoS::AtLeastOnce, payload)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => {
            a.properties.user_properties.iter().find(|(k, _)| k == "msgId").map(|(_, v)| v.clone()).expect("msgId")
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The trace of `id` once it has at least `n` events (at most 20 s).
async fn trace_with(gw: &lmq_gateway::gateway::Gateway, id: &str, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = api(gw, "GET", &format!("/api/v1/messages/{id}/trace"), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["msgId"], id);
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n || tokio::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn a_traced_qos1_message_shows_publish_stored_and_each_delivery_and_ack(core: &Core) {
    let parent = unique("opst");
    let untraced = unique("opsu");
    let gw = core.start(&format!("{OPEN_AUTH}{ADMIN}trace:\n  enabled: true\n  parents: [{parent}]\n")).await;
    let (a, b) = (unique("trace-s1"), unique("trace-s2"));
    let mut s1 = v4::connect(gw.addr(), &a).await;
    s1.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let mut s2 = v4::connect(gw.addr(), &b).await;
    s2.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let publisher = unique("trace-pub");
    let (mut pc, code) = raw_connect(gw.addr(), &publisher, Protocol::V5, None, None).await;
    assert_eq!(code, 0);
    let id = publish_v5(&mut pc, &format!("{parent}/t"), b"traced").await;
    assert_eq!(&s1.next_publish().await.payload[..], b"traced");
    assert_eq!(&s2.next_publish().await.payload[..], b"traced");

    let events = trace_with(&gw, &id, 6).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    assert_eq!(events.len(), 6, "{events:#?}");
    assert_eq!(&kinds[..2], ["publish", "stored"], "{events:#?}");
    assert_eq!(events[0]["clientId"], publisher.as_str());
    assert_eq!(events[1]["clientId"], publisher.as_str());
    assert!(events[1]["detail"].as_str().unwrap().starts_with(&format!("{parent}-")), "{events:#?}");
    for who in [&a, &b] {
        let of = |kind: &str| {
            events
                .iter()
                .position(|e| e["type"] == kind && e["clientId"] == who.as_str())
                .unwrap_or_else(|| panic!("no {kind} event for {who}: {events:#?}"))
        };
        assert!(of("delivered") < of("acked"), "{events:#?}");
    }
    // After publish and stored (whose time is when the publishing gateway heard of it, which
    // may be after the tail delivered the record), the rest by time.
    let times: Vec<i64> = events.iter().map(|e| e["time_ms"].as_i64().unwrap()).collect();
    assert!(times[2..].windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");
    assert!(times[1..].iter().all(|t| *t >= times[0]), "nothing before the publish: {times:?}");
    assert!(events.iter().all(|e| e["msgId"] == id.as_str() && e["gatewayId"].is_string()));

    // A parent outside `trace.parents`: delivered, not traced.
    let mut s3 = v4::connect(gw.addr(), &unique("trace-s3")).await;
    s3.subscribe(&format!("{untraced}/#"), v4::QoS::AtLeastOnce).await;
    let other = publish_v5(&mut pc, &format!("{untraced}/t"), b"plain").await;
    assert_eq!(&s3.next_publish().await.payload[..], b"plain");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = api(&gw, "GET", &format!("/api/v1/messages/{other}/trace"), None).await;
    assert_eq!((status, body["events"].as_array().map(Vec::len)), (200, Some(0)), "{body}");
    let (status, body) = api(&gw, "GET", "/api/v1/messages/xyz/trace", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_msg_id")), "{body}");
    gw.shutdown().await;
}

/// A QoS 0 message is acknowledged to no one, but its trace still shows where it was stored:
/// the gateway awaits its append like any other.
pub async fn a_traced_qos0_message_shows_where_it_was_stored(core: &Core) {
    let parent = unique("opst0");
    let gw = core.start(&format!("{OPEN_AUTH}{ADMIN}trace:\n  enabled: true\n  parents: [{parent}]\n")).await;
    let mut sub = v4::connect(gw.addr(), &unique("trace0-s")).await;
    sub.subscribe(&format!("{parent}/#"), v4::QoS::AtMostOnce).await;
    let publisher = unique("trace0-pub");
    let (mut pc, code) = raw_connect(gw.addr(), &publisher, Protocol::V5, None, None).await;
    assert_eq!(code, 0);
    pc.send(&publish_packet(0, &format!("{parent}/t"), p::QoS::AtMostOnce, b"fire and forget")).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"fire and forget");
    // Its ID, found by topic through the message query.
    let (status, body) = api(&gw, "GET", &format!("/api/v1/messages?topic={parent}%2Ft"), None).await;
    assert_eq!(status, 200, "{body}");
    let id = body["messages"][0]["msgId"].as_str().expect("the message is found by its topic").to_string();

    let events = trace_with(&gw, &id, 3).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap_or("")).collect();
    assert_eq!(&kinds[..2], ["publish", "stored"], "{events:#?}");
    assert!(events[1]["detail"].as_str().unwrap().starts_with(&format!("{parent}-")), "{events:#?}");
    assert!(kinds.contains(&"delivered"), "{events:#?}");
    gw.shutdown().await;
}
