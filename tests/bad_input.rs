//! Hostile and malformed input closes only the offending connection, with the right MQTT 5
//! reason code, while other clients keep working.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{connect_packet, v4, Raw, TestGateway};
use lmq_gateway::protocol::{self as p, Packet, Protocol, ReasonCode};
use std::time::Duration;

/// A bystander that must keep working whatever the others do.
async fn bystander_still_works(gw: &TestGateway) {
    let mut sub = v4::connect(gw.addr, "bystander-sub").await;
    sub.subscribe("ok/#", v4::QoS::AtLeastOnce).await;
    let mut publ = v4::connect(gw.addr, "bystander-pub").await;
    publ.publish("ok/1", v4::QoS::AtLeastOnce, false, b"still here").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"still here");
}

async fn connected(gw: &TestGateway, id: &str, protocol: Protocol) -> Raw {
    let mut raw = Raw::connect(gw.addr, protocol).await;
    raw.send(&connect_packet(id, protocol, true)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw
}

fn disconnect_code(seen: &[Packet]) -> Option<ReasonCode> {
    seen.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.code),
        _ => None,
    })
}

#[tokio::test]
async fn random_bytes_before_connect_close_the_connection() {
    let gw = TestGateway::start().await;
    let mut raw = Raw::connect(gw.addr, Protocol::V311).await;
    raw.send_bytes(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x11, 0x22, 0x33]).await;
    assert!(raw.until_closed().await.is_empty());
    bystander_still_works(&gw).await;
}

#[tokio::test]
async fn truncated_packet_then_silence_hits_the_connect_timeout() {
    let gw = TestGateway::start_with("mqtt:\n  connect_timeout_secs: 1\n").await;
    let mut raw = Raw::connect(gw.addr, Protocol::V311).await;
    raw.send_bytes(&[0x10, 0x20, 0x00, 0x04, b'M']).await; // CONNECT cut short
    let start = std::time::Instant::now();
    assert!(raw.until_closed().await.is_empty());
    assert!(start.elapsed() < Duration::from_secs(4));
    bystander_still_works(&gw).await;
}

#[tokio::test]
async fn remaining_length_over_the_limit_gets_0x95_before_the_body() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "big", Protocol::V5).await;
    // PUBLISH claiming 200 MB; only the fixed header is sent.
    raw.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    let seen = raw.until_closed().await;
    assert_eq!(disconnect_code(&seen), Some(ReasonCode::PACKET_TOO_LARGE));
    bystander_still_works(&gw).await;
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "twice", Protocol::V5).await;
    raw.send(&connect_packet("twice", Protocol::V5, true)).await;
    assert_eq!(disconnect_code(&raw.until_closed().await), Some(ReasonCode::PROTOCOL_ERROR));
}

#[tokio::test]
async fn publish_with_wildcard_topic_is_refused() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "wild", Protocol::V5).await;
    // PUBLISH QoS 0, topic "a/+", no properties: encoded by hand since the encoder
    // would refuse nothing here but the decoder must.
    raw.send_bytes(&[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'+', 0x00]).await;
    assert_eq!(disconnect_code(&raw.until_closed().await), Some(ReasonCode::TOPIC_NAME_INVALID));
    // 3.1.1: just closed.
    let mut raw = connected(&gw, "wild3", Protocol::V311).await;
    raw.send_bytes(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'#']).await;
    assert!(raw.until_closed().await.is_empty());
    bystander_still_works(&gw).await;
}

#[tokio::test]
async fn invalid_utf8_topic_is_malformed() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "utf8", Protocol::V5).await;
    raw.send_bytes(&[0x30, 0x06, 0x00, 0x03, b'a', 0xff, 0xfe, 0x00]).await;
    assert_eq!(disconnect_code(&raw.until_closed().await), Some(ReasonCode::MALFORMED_PACKET));
}

#[tokio::test]
async fn packet_id_zero_is_malformed() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "pid0", Protocol::V5).await;
    // PUBLISH QoS 1, topic "a", packet id 0, no properties.
    raw.send_bytes(&[0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x00, 0x00]).await;
    let code = disconnect_code(&raw.until_closed().await);
    assert!(code == Some(ReasonCode::MALFORMED_PACKET) || code == Some(ReasonCode::PROTOCOL_ERROR), "{code:?}");
    bystander_still_works(&gw).await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01() {
    let gw = TestGateway::start().await;
    let mut raw = Raw::connect(gw.addr, Protocol::V311).await;
    // CONNECT "MQTT" level 9.
    raw.send_bytes(&[0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x09, 0x02, 0x00, 0x1e, 0x00, 0x01, b'x']).await;
    let seen = raw.until_closed().await;
    match seen.first() {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code.to_v3_connack(), 1),
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_payload_and_long_topic_are_refused_v5() {
    let gw = TestGateway::start().await;
    let mut raw = connected(&gw, "limits", Protocol::V5).await;
    // Topic of 65 characters at QoS 1: negative PUBACK 0x90, connection stays.
    let long = "t".repeat(65);
    let publish = |topic: &str, payload: Bytes, id: u16| {
        Packet::Publish(p::Publish {
            dup: false,
            qos: p::QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: std::num::NonZeroU16::new(id),
            payload,
            properties: Default::default(),
        })
    };
    raw.send(&publish(&long, Bytes::from_static(b"x"), 1)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::TOPIC_NAME_INVALID),
        other => panic!("expected PUBACK 0x90, got {other:?}"),
    }
    // 64 characters is fine.
    raw.send(&publish(&"t".repeat(64), Bytes::from_static(b"x"), 2)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected PUBACK 0x00, got {other:?}"),
    }
    // 65,536 bytes accepted, 65,537 refused with DISCONNECT 0x95.
    raw.send(&publish("t/p", Bytes::from(vec![0u8; 65_536]), 3)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected PUBACK 0x00, got {other:?}"),
    }
    raw.send(&publish("t/p", Bytes::from(vec![0u8; 65_537]), 4)).await;
    assert_eq!(disconnect_code(&raw.until_closed().await), Some(ReasonCode::PACKET_TOO_LARGE));
}

#[tokio::test]
async fn the_31st_subscription_is_refused() {
    let gw = TestGateway::start().await;
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut raw = connected(&gw, &format!("subs-{}", protocol.level()), protocol).await;
        let filters = (0..31)
            .map(|i| (format!("s/{i}"), p::SubscriptionOptions { qos: p::QoS::AtLeastOnce, ..Default::default() }))
            .collect();
        raw.send(&Packet::Subscribe(p::Subscribe {
            packet_id: std::num::NonZeroU16::new(1).unwrap(),
            filters,
            properties: Default::default(),
        }))
        .await;
        match raw.recv().await {
            Some(Packet::SubAck(s)) => {
                assert_eq!(s.codes.len(), 31);
                assert!(s.codes[..30].iter().all(|c| *c == ReasonCode::GRANTED_QOS_1), "{:?}", s.codes);
                let last = s.codes[30];
                match protocol {
                    Protocol::V5 => assert_eq!(last, ReasonCode::QUOTA_EXCEEDED),
                    _ => assert!(last.is_error(), "3.1.1 gets 0x80"),
                }
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn many_garbage_connections_do_not_stop_service() {
    let gw = TestGateway::start().await;
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr, Protocol::V311).await;
            let junk: Vec<u8> = (0..64).map(|j| i.wrapping_mul(31).wrapping_add(j)).collect();
            raw.send_bytes(&junk).await;
            let _ = tokio::time::timeout(Duration::from_secs(3), raw.until_closed()).await;
        }));
    }
    bystander_still_works(&gw).await;
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test]
async fn limits_for_mqtt_3_1_1_clients() {
    let gw = TestGateway::start().await;
    let publish = |topic: &str, payload: Bytes, id: u16| {
        Packet::Publish(p::Publish {
            dup: false,
            qos: p::QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: std::num::NonZeroU16::new(id),
            payload,
            properties: Default::default(),
        })
    };
    // At the limits: acknowledged.
    let mut raw = connected(&gw, "limits3", Protocol::V311).await;
    raw.send(&publish(&"t".repeat(64), Bytes::from_static(b"x"), 1)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 1));
    raw.send(&publish("t/p", Bytes::from(vec![0u8; 65_536]), 2)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 2));
    // One over: 3.1.1 has no negative PUBACK, so the connection is closed without one.
    raw.send(&publish(&"t".repeat(65), Bytes::from_static(b"x"), 3)).await;
    assert!(raw.until_closed().await.is_empty());
    let mut raw = connected(&gw, "limits3b", Protocol::V311).await;
    raw.send(&publish("t/p", Bytes::from(vec![0u8; 65_537]), 4)).await;
    assert!(raw.until_closed().await.is_empty());
    assert!(gw.gateway().ctx.limits.refused(lmq_gateway::limits::Refusal::TopicTooLong) >= 1);
    assert!(gw.gateway().ctx.limits.refused(lmq_gateway::limits::Refusal::PayloadTooLarge) >= 1);
    bystander_still_works(&gw).await;
}
