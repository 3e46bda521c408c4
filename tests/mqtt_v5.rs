//! MQTT 5.0 behaviour with a real client (rumqttc v5) and the raw codec client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::v5::{self, Event, Packet, PublishProperties, QoS, SubscribeProperties};
use common::{connect_packet, Raw, TestGateway};
use lmq_gateway::protocol::{self as p, Protocol, ReasonCode};
use std::time::Duration;

#[tokio::test]
async fn user_properties_content_type_and_expiry_travel_end_to_end() {
    let gw = TestGateway::start().await;
    let mut sub = v5::connect(gw.addr, "v5-sub").await;
    sub.subscribe("props/#", QoS::AtLeastOnce).await;
    let publ = v5::connect(gw.addr, "v5-pub").await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v1".into()), ("k".into(), "v2".into())],
        content_type: Some("application/json".into()),
        message_expiry_interval: Some(3600),
        response_topic: Some("props/reply".into()),
        correlation_data: Some(Bytes::from_static(b"corr")),
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    publ.client.publish_with_properties("props/a", QoS::AtLeastOnce, false, "{}", props).await.unwrap();
    let got = sub.next_publish().await;
    let gp = got.properties.expect("properties");
    assert_eq!(gp.user_properties, vec![("k".into(), "v1".into()), ("k".into(), "v2".into())]);
    assert_eq!(gp.content_type.as_deref(), Some("application/json"));
    assert_eq!(gp.response_topic.as_deref(), Some("props/reply"));
    assert_eq!(gp.correlation_data.as_deref(), Some(&b"corr"[..]));
    assert_eq!(gp.payload_format_indicator, Some(1));
    let left = gp.message_expiry_interval.expect("expiry counts down");
    assert!(left <= 3600 && left > 3590, "{left}");
}

#[tokio::test]
async fn subscription_identifiers_and_no_local() {
    let gw = TestGateway::start().await;
    let mut c = v5::connect(gw.addr, "v5-ids").await;
    let props = SubscribeProperties { id: Some(42), user_properties: vec![] };
    c.client.subscribe_with_properties("ids/#", QoS::AtLeastOnce, props).await.unwrap();
    c.suback().await;
    let filter = rumqttc::v5::mqttbytes::v5::Filter {
        path: "nl/#".into(),
        qos: QoS::AtLeastOnce,
        nolocal: true,
        preserve_retain: false,
        retain_forward_rule: rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnEverySubscribe,
    };
    c.client.subscribe_many(vec![filter]).await.unwrap();
    c.suback().await;
    let other = v5::connect(gw.addr, "v5-other").await;
    other.client.publish("ids/x", QoS::AtLeastOnce, false, "a").await.unwrap();
    let got = c.next_publish().await;
    assert_eq!(got.properties.map(|p| p.subscription_identifiers), Some(vec![42]));
    // no-local: our own publish on nl/# is not echoed back; another client's is.
    c.client.publish("nl/1", QoS::AtLeastOnce, false, "own").await.unwrap();
    other.client.publish("nl/1", QoS::AtLeastOnce, false, "theirs").await.unwrap();
    let got = c.next_publish().await;
    assert_eq!(&got.payload[..], b"theirs");
}

#[tokio::test]
async fn shared_subscription_spreads_messages_over_the_group() {
    let gw = TestGateway::start().await;
    let mut a = v5::connect(gw.addr, "share-a").await;
    let mut b = v5::connect(gw.addr, "share-b").await;
    a.subscribe("$share/g1/jobs/#", QoS::AtLeastOnce).await;
    b.subscribe("$share/g1/jobs/#", QoS::AtLeastOnce).await;
    let publ = v5::connect(gw.addr, "share-pub").await;
    for i in 0..10 {
        publ.client.publish("jobs/x", QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut from_a = 0;
    let mut from_b = 0;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while seen.len() < 10 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            e = a.events.recv() => if let Some(Ok(Event::Incoming(Packet::Publish(p)))) = e { from_a += 1; seen.push(p.payload) },
            e = b.events.recv() => if let Some(Ok(Event::Incoming(Packet::Publish(p)))) = e { from_b += 1; seen.push(p.payload) },
        }
    }
    assert_eq!(seen.len(), 10, "each message reaches exactly one member");
    assert!(from_a > 0 && from_b > 0, "both members get work: a={from_a} b={from_b}");
}

#[tokio::test]
async fn retain_handling_and_retain_as_published() {
    let gw = TestGateway::start().await;
    let mut publ = v5::connect(gw.addr, "rh-pub").await;
    publ.client.publish("rh/x", QoS::AtLeastOnce, true, "r").await.unwrap();
    publ.wait_for(|e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    let mut c = v5::connect(gw.addr, "rh-sub").await;
    let never = rumqttc::v5::mqttbytes::v5::Filter {
        path: "rh/#".into(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain: true,
        retain_forward_rule: rumqttc::v5::mqttbytes::v5::RetainForwardRule::Never,
    };
    c.client.subscribe_many(vec![never]).await.unwrap();
    c.suback().await;
    publ.client.publish("rh/x", QoS::AtLeastOnce, true, "live").await.unwrap();
    let got = c.next_publish().await;
    assert_eq!(&got.payload[..], b"live", "retain handling 2: no retained message at subscribe");
    assert!(got.retain, "retain-as-published keeps the flag on live delivery");
}

#[tokio::test]
async fn session_expiry_and_session_present() {
    let gw = TestGateway::start().await;
    let mut o = v5::options(gw.addr, "v5-exp");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let (mut c, ack) = v5::connect_with(o.clone()).await;
    assert!(!ack.session_present);
    c.subscribe("exp/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut app = v5::connect(gw.addr, "v5-exp-app").await;
    app.client.publish("exp/1", QoS::AtLeastOnce, false, "while away").await.unwrap();
    app.wait_for(|e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    let (mut c, ack) = v5::connect_with(o).await;
    assert!(ack.session_present);
    assert_eq!(&c.next_publish().await.payload[..], b"while away");
}

#[tokio::test]
async fn topic_alias_from_client_is_resolved() {
    let gw = TestGateway::start().await;
    let mut sub = v5::connect(gw.addr, "alias-sub").await;
    sub.subscribe("alias/#", QoS::AtLeastOnce).await;
    let mut raw = Raw::connect(gw.addr, Protocol::V5).await;
    raw.send(&connect_packet("alias-pub", Protocol::V5, true)).await;
    let Some(p::Packet::ConnAck(ack)) = raw.recv().await else { panic!("no connack") };
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    assert!(ack.properties.topic_alias_maximum.unwrap_or(0) > 0);
    let mut publish = p::Publish {
        dup: false,
        qos: p::QoS::AtLeastOnce,
        retain: false,
        topic: "alias/long/topic".into(),
        packet_id: std::num::NonZeroU16::new(1),
        payload: Bytes::from_static(b"one"),
        properties: p::PublishProperties { topic_alias: Some(1), ..Default::default() },
    };
    raw.send(&p::Packet::Publish(publish.clone())).await;
    publish.topic = String::new();
    publish.packet_id = std::num::NonZeroU16::new(2);
    publish.payload = Bytes::from_static(b"two");
    raw.send(&p::Packet::Publish(publish)).await;
    for expected in [&b"one"[..], &b"two"[..]] {
        let got = sub.next_publish().await;
        assert_eq!(got.topic, "alias/long/topic");
        assert_eq!(&got.payload[..], expected);
    }
}

#[tokio::test]
async fn message_expiry_drops_stale_offline_messages() {
    let gw = TestGateway::start().await;
    let mut o = v5::options(gw.addr, "exp-msg");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let (mut c, _) = v5::connect_with(o.clone()).await;
    c.subscribe("em/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let mut app = v5::connect(gw.addr, "exp-app").await;
    let short = PublishProperties { message_expiry_interval: Some(1), ..Default::default() };
    app.client.publish_with_properties("em/1", QoS::AtLeastOnce, false, "stale", short).await.unwrap();
    app.client.publish("em/1", QoS::AtLeastOnce, false, "fresh").await.unwrap();
    app.wait_for(|e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    app.wait_for(|e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (mut c, _) = v5::connect_with(o).await;
    assert_eq!(&c.next_publish().await.payload[..], b"fresh");
}

#[tokio::test]
async fn takeover_sends_disconnect_0x8e_to_the_old_connection() {
    let gw = TestGateway::start().await;
    let mut old = Raw::connect(gw.addr, Protocol::V5).await;
    old.send(&connect_packet("take-me", Protocol::V5, true)).await;
    assert!(matches!(old.recv().await, Some(p::Packet::ConnAck(_))));
    let _new = v5::connect(gw.addr, "take-me").await;
    let seen = old.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, p::Packet::Disconnect(d) if d.code == ReasonCode::SESSION_TAKEN_OVER)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn will_delay_is_cancelled_by_a_quick_reconnect() {
    let gw = TestGateway::start().await;
    let mut watcher = v5::connect(gw.addr, "wd-watch").await;
    watcher.subscribe("wd/#", QoS::AtLeastOnce).await;
    let mut o = v5::options(gw.addr, "wd-dev");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let mut will = rumqttc::v5::mqttbytes::v5::LastWill::new("wd/dev", "dead", QoS::AtLeastOnce, false, None);
    will.properties = Some(rumqttc::v5::mqttbytes::v5::LastWillProperties {
        delay_interval: Some(2),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    });
    o.set_last_will(will.clone());
    let (c, _) = v5::connect_with(o.clone()).await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, _) = v5::connect_with(o).await; // back within the delay: no will
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let got = tokio::time::timeout(Duration::from_millis(200), watcher.next_publish()).await;
    assert!(got.is_err(), "will must not be published");
    // Now go away for longer than the delay.
    c.kill();
    let got = watcher.next_publish().await;
    assert_eq!(&got.payload[..], b"dead");
}

#[tokio::test]
async fn expired_sessions_are_swept_and_not_resumed() {
    let gw = TestGateway::start().await;
    let mut o = v5::options(gw.addr, "short-lived");
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(1));
    let (mut c, _) = v5::connect_with(o.clone()).await;
    c.subscribe("sl/#", QoS::AtLeastOnce).await;
    c.disconnect().await;
    let backend = gw.gateway().ctx.backend.clone();
    let registry = gw.gateway().ctx.registry.clone();
    assert_eq!(lmq_gateway::session::expiry::sweep_once(&backend, &registry).await, 0, "not expired yet");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(lmq_gateway::session::expiry::sweep_once(&backend, &registry).await, 1);
    let (_c, ack) = v5::connect_with(o).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn connect_on_another_gateway_takes_the_session_over() {
    let gw = TestGateway::start().await;
    let mut old = Raw::connect(gw.addr, Protocol::V5).await;
    old.send(&connect_packet("GID_x@@@roaming", Protocol::V5, true)).await;
    assert!(matches!(old.recv().await, Some(p::Packet::ConnAck(_))));
    // Another gateway reports that the same ClientId connected there, later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let event = lmq_gateway::events::ClientEvent {
        event_type: lmq_gateway::events::EventType::Connect,
        client_id: "GID_x@@@roaming".into(),
        channel_id: "other-1".into(),
        client_ip: "10.0.0.9".into(),
        time: lmq_gateway::connection::now_ms(),
        gateway_id: "another-gateway".into(),
        username: None,
        reason: None,
    };
    gw.gateway().ctx.backend.emit_event(event.clone()).await.unwrap();
    let seen = old.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, p::Packet::Disconnect(d) if d.code == ReasonCode::SESSION_TAKEN_OVER)),
        "{seen:?}"
    );
    // An event older than the local connection does not close it.
    let mut newer = Raw::connect(gw.addr, Protocol::V5).await;
    newer.send(&connect_packet("GID_x@@@roaming", Protocol::V5, true)).await;
    assert!(matches!(newer.recv().await, Some(p::Packet::ConnAck(_))));
    let stale = lmq_gateway::events::ClientEvent { time: event.time - 60_000, ..event };
    gw.gateway().ctx.backend.emit_event(stale).await.unwrap();
    newer.send(&p::Packet::PingReq).await;
    assert!(matches!(newer.recv().await, Some(p::Packet::PingResp)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    newer.send(&p::Packet::PingReq).await;
    assert!(matches!(newer.recv().await, Some(p::Packet::PingResp)), "still connected");
}

fn raw_connect(id: &str, props: p::ConnectProperties) -> p::Packet {
    p::Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: props,
    }))
}

async fn raw_client(gw: &TestGateway, id: &str, props: p::ConnectProperties) -> Raw {
    let mut raw = Raw::connect(gw.addr, Protocol::V5).await;
    raw.send(&raw_connect(id, props)).await;
    assert!(matches!(raw.recv().await, Some(p::Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    raw
}

#[tokio::test]
async fn the_gateway_sends_topic_aliases_up_to_the_clients_maximum() {
    let gw = TestGateway::start().await;
    let props = p::ConnectProperties { topic_alias_maximum: Some(1), ..Default::default() };
    let mut sub = raw_client(&gw, "alias-sub", props).await;
    sub.send(&p::Packet::Subscribe(p::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).expect("id"),
        filters: vec![("aliased/#".into(), p::SubscriptionOptions::default())],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(sub.recv().await, Some(p::Packet::SubAck(_))));
    let publ = v5::connect(gw.addr, "alias-pub").await;
    for topic in ["aliased/a", "aliased/a", "aliased/b", "aliased/b", "aliased/a"] {
        publ.client.publish(topic, QoS::AtMostOnce, false, topic).await.expect("queued");
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        if let Some(p::Packet::Publish(m)) = sub.recv().await {
            seen.push((m.topic.clone(), m.properties.topic_alias, String::from_utf8_lossy(&m.payload).into_owned()));
        }
    }
    let expected = [
        ("aliased/a", "aliased/a"), // new mapping: topic and alias 1
        ("", "aliased/a"),          // known: alias only
        ("aliased/b", "aliased/b"), // alias 1 re-assigned (maximum 1)
        ("", "aliased/b"),
        ("aliased/a", "aliased/a"),
    ];
    for ((topic, alias, payload), (want_topic, want_payload)) in seen.iter().zip(expected) {
        assert_eq!((topic.as_str(), *alias, payload.as_str()), (want_topic, Some(1), want_payload), "{seen:?}");
    }
    // A client that announced no maximum gets topic names only.
    let mut plain = v5::connect(gw.addr, "alias-none").await;
    plain.subscribe("aliased/#", QoS::AtMostOnce).await;
    publ.client.publish("aliased/c", QoS::AtMostOnce, false, "c").await.expect("queued");
    let m = plain.next_publish().await;
    assert_eq!(m.topic, "aliased/c");
    assert_eq!(m.properties.and_then(|p| p.topic_alias), None);
}

#[tokio::test]
async fn exceeding_the_receive_maximum_is_disconnected_with_0x93() {
    let gw = TestGateway::start_with("mqtt:\n  receive_maximum: 4\n").await;
    let mut c = raw_client(&gw, "greedy", Default::default()).await;
    // QoS 2 counts until PUBCOMP: five PUBLISHes without PUBREL are one too many.
    for id in 1..=5u16 {
        c.send(&p::Packet::Publish(p::Publish {
            dup: false,
            qos: p::QoS::ExactlyOnce,
            retain: false,
            topic: "greedy/t".into(),
            packet_id: std::num::NonZeroU16::new(id),
            payload: Bytes::from_static(b"x"),
            properties: Default::default(),
        }))
        .await;
        if id <= 4 {
            assert!(matches!(c.recv().await, Some(p::Packet::PubRec(_))), "PUBREC {id}");
        }
    }
    let end = c.until_closed().await;
    match end.last() {
        Some(p::Packet::Disconnect(d)) => {
            assert_eq!(d.code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
            assert!(d.properties.reason_string.as_deref().is_some_and(|r| r.contains("receive maximum")), "{d:?}");
        }
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
}

#[tokio::test]
async fn every_stored_message_has_an_id_returned_in_the_puback_and_carried_in_its_record() {
    let gw = TestGateway::start().await;
    let mut c = raw_client(&gw, "id-pub", Default::default()).await;
    let mut ids = Vec::new();
    for n in 1..=3u16 {
        c.send(&p::Packet::Publish(p::Publish {
            dup: false,
            qos: if n == 3 { p::QoS::ExactlyOnce } else { p::QoS::AtLeastOnce },
            retain: false,
            topic: "ids/t".into(),
            packet_id: std::num::NonZeroU16::new(n),
            payload: Bytes::from(format!("m{n}")),
            properties: Default::default(),
        }))
        .await;
        let props = match c.recv().await {
            Some(p::Packet::PubAck(a) | p::Packet::PubRec(a)) => a.properties,
            other => panic!("expected PUBACK / PUBREC, got {other:?}"),
        };
        let id = props.user_properties.iter().find(|(k, _)| k == "msgId").map(|(_, v)| v.clone());
        ids.push(id.expect("msgId user property"));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "time-ordered, unique: {ids:?}");
    assert!(ids.iter().all(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())), "{ids:?}");
    // The record in the core service carries the same ID.
    let backend = gw.gateway().ctx.backend.clone();
    let mut in_log = Vec::new();
    for part in 0..backend.partitions("ids").expect("topic") {
        let tp = lmq_gateway::backend::TopicPartition::new("ids", part);
        for r in backend.fetch(&tp, 0, 100).await.expect("fetch").records {
            in_log.push(String::from_utf8_lossy(r.record.header("msgId").expect("msgId header")).into_owned());
        }
    }
    in_log.sort();
    assert_eq!(in_log, ids);
}
