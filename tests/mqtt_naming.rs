//! The standard MQTT naming profile, with the shipped `deploy/gateway-mqtt.yaml`: clients
//! written for any MQTT broker use ClientIds and topics LMQ's names refuse — spaces, empty
//! ClientIds, an empty first level, `$` topics — and get what MQTT promises.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{v4, v5, Raw};
use lmq_gateway::config::Config;
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

/// The gateway on `deploy/gateway-mqtt.yaml`, listening on a free loopback port with its data
/// in a temporary directory (the only changes).
struct MqttBroker {
    gw: Gateway,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn broker() -> MqttBroker {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gateway-mqtt.yaml");
    let mut config = Config::load(std::path::Path::new(path)).expect("deploy/gateway-mqtt.yaml is valid");
    let dir = tempfile::tempdir().expect("temp dir");
    config.listeners.truncate(1);
    config.listeners[0].bind = "127.0.0.1:0".parse().expect("address");
    config.core.embedded.data_dir = dir.path().to_path_buf();
    config.admin.enabled = false;
    let gw = Gateway::start(config).await.expect("gateway starts");
    let addr = gw.addr();
    MqttBroker { gw, addr, _dir: dir }
}

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero")
}

#[tokio::test]
async fn any_utf8_client_id_connects() {
    let b = broker().await;
    let mut publisher = v4::connect(b.addr, "publisher").await;
    for id in ["clean retained", "ünïcødé/id", "$dollar", "a+b#c"] {
        let mut c = v4::connect(b.addr, id).await;
        assert!(b.gw.ctx.registry.get(id).is_some(), "connected as `{id}`");
        c.subscribe("ids/t", v4::QoS::AtLeastOnce).await;
        publisher.publish("ids/t", v4::QoS::AtLeastOnce, false, id.as_bytes()).await;
        assert_eq!(&c.next_publish().await.payload[..], id.as_bytes());
        c.disconnect().await;
    }
}

#[tokio::test]
async fn an_empty_client_id_is_assigned_on_3_1_1_and_5() {
    let b = broker().await;
    // 3.1.1, clean session: accepted [MQTT-3.1.3-6].
    let mut raw = Raw::connect(b.addr, Protocol::V311).await;
    raw.send(&common::connect_packet("", Protocol::V311, true)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // 3.1.1 without clean session: refused with identifier rejected [MQTT-3.1.3-8].
    let mut raw = Raw::connect(b.addr, Protocol::V311).await;
    raw.send(&common::connect_packet("", Protocol::V311, false)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code.to_v3_connack(), 2),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // MQTT 5: the CONNACK says which ClientId was assigned.
    let (_c, ack) = v5::connect_with(v5::options(b.addr, "")).await;
    let assigned = ack.properties.and_then(|p| p.assigned_client_identifier).expect("Assigned Client Identifier");
    assert!(!assigned.is_empty());
    assert!(b.gw.ctx.registry.get(&assigned).is_some(), "connected under the assigned ClientId");
}

#[tokio::test]
async fn an_empty_first_level_is_a_topic_like_any_other() {
    let b = broker().await;
    let mut exact = v4::connect(b.addr, "sub exact").await;
    exact.subscribe("/TopicA", v4::QoS::AtLeastOnce).await;
    let mut all = v4::connect(b.addr, "sub all").await;
    all.subscribe("#", v4::QoS::AtLeastOnce).await;
    let mut level = v4::connect(b.addr, "sub level").await;
    level.subscribe("+/TopicA", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(b.addr, "pub").await;
    publisher.publish("/TopicA", v4::QoS::AtLeastOnce, false, b"empty first level").await;
    for c in [&mut exact, &mut all, &mut level] {
        let m = c.next_publish().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("/TopicA", &b"empty first level"[..]));
    }
    // Empty levels anywhere.
    exact.subscribe("a//b/", v4::QoS::AtLeastOnce).await;
    publisher.publish("a//b/", v4::QoS::AtLeastOnce, false, b"empty levels").await;
    assert_eq!(exact.next_publish().await.topic, "a//b/");
}

#[tokio::test]
async fn dollar_topics_are_published_and_retained_but_not_matched_by_first_level_wildcards() {
    let b = broker().await;
    let mut all = v4::connect(b.addr, "wild").await;
    all.subscribe("#", v4::QoS::AtLeastOnce).await;
    let mut plus = v4::connect(b.addr, "plus").await;
    plus.subscribe("+/B", v4::QoS::AtLeastOnce).await;
    let mut exact = v4::connect(b.addr, "exact").await;
    exact.subscribe("$TopicA/#", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(b.addr, "publisher").await;
    // QoS 1 gets its PUBACK (it used to get none), and the subscriber of the `$` filter the message.
    publisher.publish("$TopicA/B", v4::QoS::AtLeastOnce, true, b"dollar retained").await;
    let m = exact.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("$TopicA/B", &b"dollar retained"[..]));
    assert!(all.no_publish(Duration::from_millis(500)).await, "`#` does not match `$` topics [MQTT-4.7.2-1]");
    assert!(plus.no_publish(Duration::from_millis(100)).await, "`+/B` does not match `$TopicA/B`");
    // Retained like any other topic.
    let mut late = v4::connect(b.addr, "late").await;
    late.subscribe("$TopicA/B", v4::QoS::AtLeastOnce).await;
    let r = late.next_publish().await;
    assert!(r.retain);
    assert_eq!(&r.payload[..], b"dollar retained");
}

#[tokio::test]
async fn sys_topics_stay_closed() {
    let b = broker().await;
    let mut raw = Raw::connect(b.addr, Protocol::V5).await;
    raw.send(&common::connect_packet("sys-prober", Protocol::V5, true)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    raw.send(&Packet::Publish(p::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "$SYS/broker/uptime".into(),
        packet_id: Some(pid(1)),
        payload: Bytes::from_static(b"forged"),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_error(), "PUBACK {:?}", a.code),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_will_on_keepalive_timeout_reaches_an_empty_first_level() {
    let b = broker().await;
    let mut watcher = v4::connect(b.addr, "will watcher").await;
    watcher.subscribe("/TopicA", v4::QoS::AtLeastOnce).await;
    let mut raw = Raw::connect(b.addr, Protocol::V311).await;
    raw.send(&Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 1,
        client_id: "silent client".into(),
        will: Some(p::LastWill {
            topic: "/TopicA".into(),
            payload: Bytes::from_static(b"client not responding"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        }),
        username: None,
        password: None,
        properties: Default::default(),
    })))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    // Silent past 1.5 × keepalive: the gateway closes it and publishes the will.
    let m = watcher.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("/TopicA", &b"client not responding"[..]));
    assert!(raw.until_closed().await.is_empty());
}

#[tokio::test]
async fn mqtt_3_1_clients_connect() {
    let b = broker().await;
    let mut raw = Raw::connect(b.addr, Protocol::V31).await;
    raw.send(&common::connect_packet("old device", Protocol::V31, true)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn p2p_looking_topics_are_ordinary_topics() {
    let b = broker().await;
    let mut sub = v4::connect(b.addr, "p2p watcher").await;
    sub.subscribe("room/p2p/#", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(b.addr, "p2p pub").await;
    // Under LMQ names only the client `device` would get it; here every subscriber does.
    publisher.publish("room/p2p/device", v4::QoS::AtLeastOnce, false, b"for all").await;
    let m = sub.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("room/p2p/device", &b"for all"[..]));
}
