//! Shared state a client can make the gateway hold is bounded (SPEC §8), tried as an attacker
//! with an ordinary key would: core topics created through `*`, share groups, acknowledgements
//! held above an unacknowledged message, delayed wills and persistent sessions per identity.
//! Each bound answers the one client that reaches it (0x97) and leaves everyone else served.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{Raw, TestGateway};
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::num::NonZeroU16;
use std::time::Duration;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero packet id")
}

fn connect(id: &str, expiry: u32, will: Option<p::LastWill>) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: false,
        keep_alive: 30,
        client_id: id.into(),
        will,
        username: None,
        password: None,
        properties: p::ConnectProperties { session_expiry_interval: Some(expiry), ..Default::default() },
    }))
}

/// Connect over MQTT 5; returns the CONNACK's reason code and the client.
async fn open(gw: &TestGateway, c: Packet) -> (ReasonCode, Raw) {
    let mut raw = Raw::connect(gw.addr, Protocol::V5).await;
    raw.send(&c).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => (a.code, raw),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn connected(gw: &TestGateway, id: &str) -> Raw {
    let (code, raw) = open(gw, connect(id, 0, None)).await;
    assert_eq!(code, ReasonCode::SUCCESS, "CONNACK of {id}");
    raw
}

/// SUBSCRIBE at QoS 1; returns the SUBACK's codes.
async fn subscribe(raw: &mut Raw, id: u16, filters: &[&str]) -> Vec<ReasonCode> {
    raw.send(&Packet::Subscribe(p::Subscribe {
        packet_id: pid(id),
        filters: filters
            .iter()
            .map(|f| ((*f).to_string(), p::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() }))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => a.codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// QoS 1 PUBLISH; returns the PUBACK's code.
async fn publish(raw: &mut Raw, id: u16, topic: &str, payload: &str) -> ReasonCode {
    raw.send(&Packet::Publish(p::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: Some(pid(id)),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => a.code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The next PUBLISH reaching `raw` within `wait`, skipping other packets.
async fn next_publish(raw: &mut Raw, wait: Duration) -> Option<p::Publish> {
    tokio::time::timeout(wait, async {
        loop {
            match raw.recv().await {
                Some(Packet::Publish(m)) => return Some(m),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

async fn refusals(gw: &TestGateway, reason: &str) -> f64 {
    gw.metric("lmq_limit_refusals_total", &[("reason", reason)]).await
}

#[tokio::test]
async fn core_topics_created_through_any_parent_are_bounded() {
    let gw = TestGateway::start_admin("limits:\n  max_core_topics: 3\n").await;
    let mut c = connected(&gw, "topics-attacker").await;
    for (i, parent) in ["ta", "tb", "tc"].iter().enumerate() {
        assert_eq!(publish(&mut c, i as u16 + 1, &format!("{parent}/x"), "m").await, ReasonCode::SUCCESS);
    }
    // A fourth first level would be a fourth core topic: refused, for PUBLISH and SUBSCRIBE.
    assert_eq!(publish(&mut c, 4, "td/x", "m").await, ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(subscribe(&mut c, 5, &["te/#"]).await, vec![ReasonCode::QUOTA_EXCEEDED]);
    assert!(refusals(&gw, "core_topic_limit").await >= 2.0);
    // The connection stays up, and topics in use keep working for everyone.
    assert_eq!(subscribe(&mut c, 6, &["ta/#"]).await, vec![ReasonCode(1)]);
    let mut other = connected(&gw, "topics-bystander").await;
    assert_eq!(publish(&mut other, 1, "ta/y", "still served").await, ReasonCode::SUCCESS);
    let m = next_publish(&mut c, Duration::from_secs(5)).await.expect("message on a topic in use");
    assert_eq!(&m.payload[..], b"still served");
}

#[tokio::test]
async fn share_groups_per_client_are_bounded() {
    let gw = TestGateway::start_admin("limits:\n  max_share_groups_per_client: 2\n").await;
    let mut c = connected(&gw, "groups-attacker").await;
    let codes = subscribe(&mut c, 1, &["$share/g1/sg/a", "$share/g2/sg/a", "$share/g3/sg/a", "$share/g1/sg/b"]).await;
    assert_eq!(codes, vec![ReasonCode(1), ReasonCode(1), ReasonCode::QUOTA_EXCEEDED, ReasonCode(1)]);
    assert_eq!(subscribe(&mut c, 2, &["$share/g4/sg/c"]).await, vec![ReasonCode::QUOTA_EXCEEDED]);
    assert_eq!(refusals(&gw, "too_many_share_groups").await, 2.0);
    // Leaving a group makes room for another.
    c.send(&Packet::Unsubscribe(p::Unsubscribe {
        packet_id: pid(3),
        filters: vec!["$share/g2/sg/a".into()],
        user_properties: Default::default(),
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::UnsubAck(_))));
    assert_eq!(subscribe(&mut c, 4, &["$share/g4/sg/c"]).await, vec![ReasonCode(1)]);
}

#[tokio::test]
async fn acknowledging_around_one_held_message_is_bounded() {
    let gw = TestGateway::start_admin("mqtt:\n  max_acked_above: 5\n").await;
    let (code, mut sub) = open(&gw, connect("acks-attacker", 600, None)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(subscribe(&mut sub, 1, &["acks/#"]).await, vec![ReasonCode(1)]);
    let mut publisher = connected(&gw, "acks-publisher").await;
    assert_eq!(publish(&mut publisher, 1, "acks/t", "m0").await, ReasonCode::SUCCESS);
    // Hold the first message, acknowledge every later one: the gateway would have to
    // remember each acknowledgement until the first is acknowledged.
    let first = next_publish(&mut sub, Duration::from_secs(5)).await.expect("first message");
    assert_eq!(&first.payload[..], b"m0");
    let mut acked = 0;
    let mut end = None;
    for i in 1..20u16 {
        assert_eq!(publish(&mut publisher, i + 1, "acks/t", &format!("m{i}")).await, ReasonCode::SUCCESS);
        match sub.recv().await {
            Some(Packet::Publish(m)) => {
                sub.send(&Packet::PubAck(p::PubResponse::new(m.packet_id.expect("QoS 1")))).await;
                acked += 1;
            }
            Some(Packet::Disconnect(d)) => {
                end = Some(d.code);
                break;
            }
            other => panic!("expected PUBLISH or DISCONNECT, got {other:?}"),
        }
    }
    assert_eq!(end, Some(ReasonCode::QUOTA_EXCEEDED), "disconnected with 0x97 (after {acked} acknowledgements)");
    assert_eq!(acked, 6, "disconnected at the first acknowledgement beyond the bound");
    assert_eq!(refusals(&gw, "acked_above_limit").await, 1.0);
    // Nothing is lost: back with its session, the client gets the held message again.
    let (code, mut back) = open(&gw, connect("acks-attacker", 600, None)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let again = next_publish(&mut back, Duration::from_secs(5)).await.expect("held message re-sent");
    assert_eq!(&again.payload[..], b"m0");
    assert!(again.dup, "re-sent as a duplicate");
}

fn delayed_will(payload: &str) -> Option<p::LastWill> {
    Some(p::LastWill {
        topic: "wills/t".into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: p::WillProperties { will_delay_interval: Some(60), ..Default::default() },
    })
}

#[tokio::test]
async fn delayed_wills_per_identity_are_bounded() {
    let gw = TestGateway::start_admin("limits:\n  max_delayed_wills_per_identity: 1\n").await;
    let mut watcher = connected(&gw, "wills-watcher").await;
    assert_eq!(subscribe(&mut watcher, 1, &["wills/#"]).await, vec![ReasonCode(1)]);
    // Both connections drop without DISCONNECT: their wills are due after 60 s.
    let (code, first) = open(&gw, connect("wills-a", 600, delayed_will("will-a"))).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while refusals(&gw, "delayed_wills_per_identity").await == 0.0
        && gw.gateway().ctx.registry.delayed_wills("anonymous:") == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "first will never parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, second) = open(&gw, connect("wills-b", 600, delayed_will("will-b"))).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    drop(second);
    // The identity already has one will waiting: the second is published at once, not kept.
    let m = next_publish(&mut watcher, Duration::from_secs(5)).await.expect("second will published at once");
    assert_eq!(&m.payload[..], b"will-b");
    assert!(next_publish(&mut watcher, Duration::from_secs(1)).await.is_none(), "the first will still waits");
    assert_eq!(refusals(&gw, "delayed_wills_per_identity").await, 1.0);
}

#[tokio::test]
async fn persistent_sessions_per_identity_are_bounded() {
    let gw = TestGateway::start_admin("limits:\n  max_sessions_per_identity: 2\n").await;
    for id in ["sess-1", "sess-2"] {
        let (code, raw) = open(&gw, connect(id, 600, None)).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{id}");
        drop(raw);
    }
    // A third persistent session for the same identity is refused …
    let (code, _) = open(&gw, connect("sess-3", 600, None)).await;
    assert_eq!(code, ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(refusals(&gw, "sessions_per_identity").await, 1.0);
    // … while resuming an existing one, and sessions that end with the connection, are not.
    let (code, _resumed) = open(&gw, connect("sess-1", 600, None)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (code, _) = open(&gw, connect("sess-volatile", 0, None)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    // A 3.1.1 client asking for a persistent session hears "server unavailable".
    let mut old = Raw::connect(gw.addr, Protocol::V311).await;
    old.send(&common::connect_packet("sess-311", Protocol::V311, false)).await;
    match old.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code.to_v3_connack(), 3),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}
