//! The reserved namespace (SPEC §8) against a device with an ordinary key that may publish and
//! subscribe `#` under parent `*` (the shipped configuration): it cannot read the status events,
//! cannot forge one, cannot reach any internal topic, and a `#` subscription carries none of
//! them — while ordinary messages flow as usual. Embedded core service; the Kafka and RocketMQ
//! variants are in `tests/kafka.rs` and `tests/rocketmq.rs`.

mod common;

use bytes::Bytes;
use common::{v4, v5, Raw, TestGateway};
use lmq_gateway::auth::signature::sign;
use lmq_gateway::config::Config;
use lmq_gateway::events::{ClientEvent, EventType, GATEWAY_HEADER};
use lmq_gateway::gateway::Gateway;
use lmq_gateway::limits::Refusal;
use lmq_gateway::protocol::{self as p, Packet, Protocol, ReasonCode};
use std::net::SocketAddr;
use std::time::Duration;

const EVENTS: &str = "GID_LMQ_STATUS";

/// The shipped setup: signature mode, one key allowed everything, parent `*` (the default).
const AUTH: &str = "auth:
  allow_plain_client_ids: true
  instance_id: inst
  access_keys:
    - id: ak
      secret: s3cret
      publish: [\"#\"]
      subscribe: [\"#\"]
";

const USER: &str = "Signature|ak|inst";

fn creds(opts: &mut v4::MqttOptions, id: &str) {
    opts.set_credentials(USER, sign("s3cret", id));
}

async fn device_v4(addr: SocketAddr, id: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    creds(&mut o, id);
    v4::connect_with(o).await
}

async fn device_v5(addr: SocketAddr, id: &str) -> v5::Client {
    let mut o = v5::options(addr, id);
    o.set_credentials(USER, sign("s3cret", id));
    v5::connect_with(o).await.0
}

/// User name and password of `id` under the key.
fn login(id: &str) -> Option<(String, String)> {
    Some((USER.to_owned(), sign("s3cret", id)))
}

async fn raw(addr: SocketAddr, id: &str, protocol: Protocol) -> Raw {
    let (raw, code) = common::raw_connect(addr, id, protocol, login(id), None).await;
    assert_eq!(code, 0, "{id} connects");
    raw
}

fn forged_connect(victim: &str) -> Vec<u8> {
    let now = lmq_gateway::now_ms();
    serde_json::to_vec(&serde_json::json!({
        "eventType": "connect",
        "clientId": victim,
        "channelId": "forged-channel",
        "clientIp": "10.6.6.6",
        "time": now + 60_000,
        "gatewayId": "forged",
    }))
    .unwrap()
}

async fn assert_unreachable(addr: SocketAddr, topics: &[&str]) {
    for topic in topics {
        common::assert_topic_unreachable(addr, topic, login).await;
    }
}

#[tokio::test]
async fn events_topic_cannot_be_subscribed_and_wildcards_carry_no_events() {
    let gw = TestGateway::start_with(AUTH).await;
    let addr = gw.addr;
    // 3.1.1: the events topic (exactly, and below it) is refused; `#` is granted.
    let mut spy = device_v4(addr, "spy3").await;
    for f in [EVENTS, "GID_LMQ_STATUS/#", "gid_lmq_status"] {
        let ack = spy.subscribe(f, v4::QoS::AtLeastOnce).await;
        assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Failure], "{f}");
    }
    let ack = spy.subscribe("#", v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]);
    // 5.0: Not authorized; `+/#` granted.
    let mut spy5 = device_v5(addr, "spy5").await;
    let ack = spy5.subscribe(EVENTS, v5::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]);
    let ack = spy5.subscribe("+/#", v5::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]);

    // Other devices come and go; one publishes an ordinary message meanwhile.
    let other = device_v4(addr, "other-1").await;
    other.disconnect().await;
    device_v4(addr, "other-2").await.kill();
    let mut publisher = device_v4(addr, "pub-1").await;
    publisher.publish("sensors/room1", v4::QoS::AtLeastOnce, false, b"21.5").await;

    // The wildcard subscribers get the message, and nothing else: no status event.
    let m = spy.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("sensors/room1", &b"21.5"[..]));
    let m = spy5.next_publish().await;
    assert_eq!((&m.topic[..], &m.payload[..]), (&b"sensors/room1"[..], &b"21.5"[..]));
    assert!(spy.no_publish(Duration::from_millis(800)).await);
    match tokio::time::timeout(Duration::from_millis(200), spy5.next_publish()).await {
        Err(_) => {}
        Ok(m) => panic!("5.0 wildcard subscriber got {:?}", m.topic),
    }
    // The events were written: there was something to leak.
    let events = gw.status_events().await;
    for id in ["other-1", "other-2"] {
        assert!(events.iter().any(|(t, b)| t == "connect" && b["clientId"] == id), "{id} connect event: {events:?}");
    }
    assert_eq!(gw.gateway().ctx.limits.refused(Refusal::ReservedTopic), 4);
}

#[tokio::test]
async fn forged_connect_event_is_refused_and_the_victim_stays_connected() {
    let gw = TestGateway::start_with(AUTH).await;
    let addr = gw.addr;
    let mut victim = device_v4(addr, "victim").await;
    victim.subscribe("cmd/victim", v4::QoS::AtLeastOnce).await;

    // MQTT 5, QoS 1 and 2: negative acknowledgement, the attacker stays connected.
    let mut attacker = raw(addr, "attacker5", Protocol::V5).await;
    attacker.send(&common::publish_packet(1, EVENTS, p::QoS::AtLeastOnce, &forged_connect("victim"))).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::NOT_AUTHORIZED));
    attacker.send(&common::publish_packet(2, EVENTS, p::QoS::ExactlyOnce, &forged_connect("victim"))).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PubRec(a)) if a.code == ReasonCode::NOT_AUTHORIZED));
    attacker.send(&Packet::PingReq).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PingResp)), "attacker still connected");
    // MQTT 3.1.1: no negative PUBACK exists; the publisher is disconnected.
    let mut attacker3 = raw(addr, "attacker3", Protocol::V311).await;
    attacker3.send(&common::publish_packet(1, EVENTS, p::QoS::AtLeastOnce, &forged_connect("victim"))).await;
    assert!(attacker3.until_closed().await.is_empty(), "3.1.1: closed without PUBACK");

    // The victim is still there and still receives.
    let mut sender = device_v4(addr, "sender").await;
    sender.publish("cmd/victim", v4::QoS::AtLeastOnce, false, b"still-here").await;
    let m = victim.next_publish().await;
    assert_eq!(&m.payload[..], b"still-here");
    assert!(gw.gateway().ctx.registry.get("victim").is_some(), "victim still registered");
    // Nothing forged reached the events topic.
    let events = gw.status_events().await;
    assert!(events.iter().all(|(_, b)| b["gatewayId"] != "forged"), "{events:?}");
}

#[tokio::test]
async fn internal_topic_names_are_refused_for_publish_and_subscribe() {
    let gw = TestGateway::start_admin(AUTH).await;
    assert_unreachable(gw.addr, &[EVENTS, "gid_lmq_status", "lmq-sessions", "lmq-delay", "LMQ-trace"]).await;
    // Counted by reason: per name 6 SUBSCRIBEs, 6 PUBLISHes, 2 wills.
    let refused = gw.metric("lmq_limit_refusals_total", &[("reason", "reserved_topic")]).await;
    assert_eq!(refused, 5.0 * 14.0);
    // A renamed events topic is reserved under its new name (and the old name is free).
    let gw2 = TestGateway::start_with(&format!("topics:\n  events_topic: EV_status\n{AUTH}")).await;
    assert_unreachable(gw2.addr, &["EV_status"]).await;
    let mut c = raw(gw2.addr, "free", Protocol::V5).await;
    assert_eq!(c.suback_code(1, EVENTS).await, 0x01);
    assert!(gw2.gateway().ctx.limits.refused(Refusal::ReservedTopic) > 0);
}

#[tokio::test]
async fn only_events_marked_by_a_gateway_take_a_client_over() {
    let gw = TestGateway::start_with(AUTH).await;
    let mut victim = device_v4(gw.addr, "victim").await;
    victim.subscribe("cmd/victim", v4::QoS::AtLeastOnce).await;
    let backend = gw.gateway().ctx.backend.clone();
    let event = ClientEvent {
        event_type: EventType::Connect,
        client_id: "victim".into(),
        channel_id: "elsewhere".into(),
        client_ip: "10.0.0.9".into(),
        time: lmq_gateway::now_ms() + 60_000,
        gateway_id: "gw-other".into(),
        username: None,
        reason: None,
    };
    // Written around the gateway (an application with write access to the core service),
    // without the gateway marker: ignored.
    let mut unmarked = event.to_record();
    unmarked.headers.retain(|(k, _)| k != GATEWAY_HEADER);
    backend.append(EVENTS, unmarked).await.expect("appended");
    let mut sender = device_v4(gw.addr, "sender").await;
    sender.publish("cmd/victim", v4::QoS::AtLeastOnce, false, b"after-unmarked").await;
    assert_eq!(&victim.next_publish().await.payload[..], b"after-unmarked");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.gateway().ctx.registry.get("victim").is_some(), "an unmarked event kicked the victim");
    // The genuine event of another gateway does take the ClientId over (the test can fail).
    backend.append(EVENTS, event.to_record()).await.expect("appended");
    victim.closed_by_server().await;
}

#[test]
fn config_refuses_parents_mapped_onto_reserved_topics() {
    for (yaml, reserved) in [
        ("topics:\n  parents:\n    - name: foo\n      core_topic: lmq-sessions\n", "lmq-sessions"),
        ("topics:\n  parents:\n    - name: foo\n      core_topic: GID_LMQ_STATUS\n", "GID_LMQ_STATUS"),
        ("topics:\n  events_topic: EV\n  parents:\n    - name: status\n      core_topic: EV\n", "EV"),
        ("topics:\n  parents:\n    - name: GID_LMQ_STATUS\n", "GID_LMQ_STATUS"),
        (
            "core:\n  kind: kafka\ntopics:\n  parents:\n    - name: creds\n      core_topic: lmq-credentials\n",
            "lmq-credentials",
        ),
        (
            "core:\n  kind: rocketmq\ntopics:\n  parents:\n    - name: st\n      core_topic: LMQ_GATEWAY_STATE\n",
            "LMQ_GATEWAY_STATE",
        ),
    ] {
        let err = Config::from_yaml(yaml).expect_err(yaml).to_string();
        assert!(err.contains(&format!("`{reserved}` is reserved")), "{yaml}: {err}");
    }
    assert!(Config::from_yaml("topics:\n  parents:\n    - name: foo\n      core_topic: iot.foo\n").is_ok());
}

/// A persistent session stored before a topic became reserved (here: by moving
/// `topics.reserved_prefix`) loses that subscription when it returns: the CONNECT succeeds,
/// and records of the now-reserved topic are not delivered, while the session works.
#[tokio::test]
async fn restored_subscriptions_to_reserved_topics_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = |prefix: &str| {
        format!(
            "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\ncore:\n  embedded:\n    data_dir: {}\n\
             topics:\n  reserved_prefix: {prefix}\n{AUTH}",
            dir.path().display()
        )
    };
    let persistent = |addr| {
        let mut o = v4::options(addr, "legacy");
        creds(&mut o, "legacy");
        o.set_clean_session(false);
        o
    };
    let gw = Gateway::start(Config::from_yaml(&yaml("old-")).unwrap()).await.unwrap();
    let mut c = v4::connect_with(persistent(gw.addr())).await;
    let ack = c.subscribe("lmq-legacy/#", v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]);
    c.subscribe("cmd/legacy", v4::QoS::AtLeastOnce).await;
    c.disconnect().await;
    gw.shutdown().await;

    let gw = Gateway::start(Config::from_yaml(&yaml("lmq-")).unwrap()).await.unwrap();
    // Written while the client is away, into the topic that is reserved now.
    let record = |topic: &str, payload: &'static [u8]| lmq_gateway::backend::CoreRecord {
        key: None,
        headers: vec![("topic".into(), Bytes::copy_from_slice(topic.as_bytes()))],
        value: Bytes::from_static(payload),
        timestamp_ms: lmq_gateway::now_ms(),
    };
    gw.ctx.backend.append("lmq-legacy", record("lmq-legacy/x", b"internal")).await.expect("append");
    let mut c = v4::connect_with(persistent(gw.addr())).await;
    let mut sender = device_v4(gw.addr(), "sender").await;
    sender.publish("cmd/legacy", v4::QoS::AtLeastOnce, false, b"ordinary").await;
    let m = c.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("cmd/legacy", &b"ordinary"[..]));
    gw.ctx.backend.append("lmq-legacy", record("lmq-legacy/y", b"internal-2")).await.expect("append");
    assert!(c.no_publish(Duration::from_millis(800)).await);
    gw.shutdown().await;
}
