//! Delivery guarantees seen from the wire: acknowledgement order, in-flight window,
//! redelivery with original packet identifiers, QoS 2 exactly-once, slow subscribers,
//! keepalive, and status events.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{connect_packet, v4, Raw, TestGateway};
use lmq_gateway::backend::TopicPartition;
use lmq_gateway::protocol::{self as p, Packet, Protocol, PubResponse, QoS, ReasonCode};
use std::num::NonZeroU16;
use std::time::Duration;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn publish(topic: &str, qos: QoS, id: Option<u16>, payload: &'static [u8]) -> Packet {
    Packet::Publish(p::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: id.map(pid),
        payload: Bytes::from_static(payload),
        properties: Default::default(),
    })
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(p::Subscribe {
        packet_id: pid(1),
        filters: vec![(filter.into(), p::SubscriptionOptions { qos, ..Default::default() })],
        properties: Default::default(),
    })
}

async fn connected(gw: &TestGateway, connect: Packet, protocol: Protocol) -> (Raw, bool) {
    let mut raw = Raw::connect(gw.addr, protocol).await;
    raw.send(&connect).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => {
            assert_eq!(a.code, ReasonCode::SUCCESS);
            (raw, a.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn expect_publish(raw: &mut Raw) -> p::Publish {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(p)) => return p,
            Some(Packet::SubAck(_)) | Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn qos0_publish_followed_by_disconnect_is_delivered() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "q0d-sub").await;
    sub.subscribe("q0d/#", v4::QoS::AtMostOnce).await;
    let (mut raw, _) = connected(&gw, connect_packet("q0d-pub", Protocol::V311, true), Protocol::V311).await;
    raw.send(&publish("q0d/x", QoS::AtMostOnce, None, b"last words")).await;
    raw.send(&Packet::Disconnect(Default::default())).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"last words");
}

#[tokio::test]
async fn pubacks_come_in_publish_order() {
    let gw = TestGateway::start().await;
    let (mut raw, _) = connected(&gw, connect_packet("order", Protocol::V311, true), Protocol::V311).await;
    for i in 1..=50u16 {
        raw.send(&publish(&format!("o/{}", i % 7), QoS::AtLeastOnce, Some(i), b"x")).await;
    }
    for i in 1..=50u16 {
        match raw.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.packet_id.get(), i),
            other => panic!("expected PUBACK {i}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn qos2_resent_before_pubrel_is_stored_once() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "q2-sub").await;
    sub.subscribe("q2/#", v4::QoS::ExactlyOnce).await;
    let (mut raw, _) = connected(&gw, connect_packet("q2-pub", Protocol::V311, true), Protocol::V311).await;
    raw.send(&publish("q2/x", QoS::ExactlyOnce, Some(9), b"once")).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 9));
    // Same packet again (as after a lost PUBREC), then PUBREL.
    let Packet::Publish(mut again) = publish("q2/x", QoS::ExactlyOnce, Some(9), b"once") else { unreachable!() };
    again.dup = true;
    raw.send(&Packet::Publish(again)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 9));
    raw.send(&Packet::PubRel(PubResponse::new(pid(9)))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubComp(r)) if r.packet_id.get() == 9));
    assert_eq!(&sub.next_publish().await.payload[..], b"once");
    assert!(sub.no_publish(Duration::from_millis(400)).await, "delivered exactly once");
}

#[tokio::test]
async fn receive_maximum_bounds_messages_in_flight() {
    let gw = TestGateway::start().await;
    let mut c = connect_packet("rm", Protocol::V5, true);
    if let Packet::Connect(ref mut c) = c {
        c.properties.receive_maximum = Some(2);
    }
    let (mut raw, _) = connected(&gw, c, Protocol::V5).await;
    raw.send(&subscribe("rm/#", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut app = v4::connect(gw.addr, "rm-app").await;
    for i in 0..5 {
        app.publish("rm/x", v4::QoS::AtLeastOnce, false, format!("{i}").as_bytes()).await;
    }
    let a = expect_publish(&mut raw).await;
    let b = expect_publish(&mut raw).await;
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"0"[..], &b"1"[..]));
    // Nothing more until we acknowledge.
    let more = tokio::time::timeout(Duration::from_millis(400), raw.recv()).await;
    assert!(more.is_err(), "third message sent beyond Receive Maximum: {more:?}");
    raw.send(&Packet::PubAck(PubResponse::new(a.packet_id.unwrap()))).await;
    assert_eq!(&expect_publish(&mut raw).await.payload[..], b"2");
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_with_their_packet_ids() {
    let gw = TestGateway::start().await;
    let connect = connect_packet("resend", Protocol::V311, false);
    let (mut raw, present) = connected(&gw, connect.clone(), Protocol::V311).await;
    assert!(!present);
    raw.send(&subscribe("rs/#", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut app = v4::connect(gw.addr, "rs-app").await;
    app.publish("rs/1", v4::QoS::AtLeastOnce, false, b"acked").await;
    app.publish("rs/1", v4::QoS::AtLeastOnce, false, b"not acked").await;
    let first = expect_publish(&mut raw).await;
    let second = expect_publish(&mut raw).await;
    raw.send(&Packet::PubAck(PubResponse::new(first.packet_id.unwrap()))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(raw); // network failure: no DISCONNECT
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut raw, present) = connected(&gw, connect, Protocol::V311).await;
    assert!(present, "session present after reconnect");
    let again = expect_publish(&mut raw).await;
    assert_eq!(&again.payload[..], b"not acked");
    assert_eq!(again.packet_id, second.packet_id, "original packet identifier [MQTT-4.4.0-1]");
    assert!(again.dup);
    let more = tokio::time::timeout(Duration::from_millis(400), raw.recv()).await;
    assert!(more.is_err(), "the acknowledged message must not come again: {more:?}");
}

#[tokio::test]
async fn slow_subscriber_blocks_no_one_and_loses_no_qos1() {
    // A tiny queue makes the slow path certain.
    let gw = TestGateway::start_with("mqtt:\n  queue_capacity: 4\n").await;
    // The slow one subscribes and then does not read its socket for a while.
    let (mut slow, _) = connected(&gw, connect_packet("slow", Protocol::V311, true), Protocol::V311).await;
    slow.send(&subscribe("flood/#", QoS::AtLeastOnce)).await;
    assert!(matches!(slow.recv().await, Some(Packet::SubAck(_))));
    let mut fast = v4::connect(gw.addr, "fast").await;
    fast.subscribe("flood/#", v4::QoS::AtLeastOnce).await;

    let n = 2000usize;
    let payload = vec![b'x'; 2048];
    let (mut publ, _) = connected(&gw, connect_packet("flooder", Protocol::V311, true), Protocol::V311).await;
    for i in 0..n {
        let mut body = format!("{i:06}").into_bytes();
        body.extend_from_slice(&payload);
        let pk = Packet::Publish(p::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "flood/x".into(),
            packet_id: NonZeroU16::new((i % 60000 + 1) as u16),
            payload: Bytes::from(body),
            properties: Default::default(),
        });
        publ.send(&pk).await;
        if i % 64 == 63 {
            // Keep within the gateway's receive window.
            for _ in 0..64 {
                assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
            }
        }
    }
    // The fast subscriber gets everything, in order, while the slow one sleeps.
    for i in 0..n {
        let m = fast.next_publish().await;
        assert_eq!(&m.payload[..6], format!("{i:06}").as_bytes());
    }
    // Now the slow one reads: every QoS 1 message arrives, in order, none twice.
    for i in 0..n {
        let m = expect_publish(&mut slow).await;
        assert_eq!(&m.payload[..6], format!("{i:06}").as_bytes(), "message {i}");
        slow.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap()))).await;
    }
    assert!(gw.gateway().ctx.router.stats.lag_events.get() > 0, "the slow path was taken");
}

#[tokio::test]
async fn keepalive_timeout_disconnects_with_0x8d() {
    let gw = TestGateway::start().await;
    let mut c = connect_packet("ka", Protocol::V5, true);
    if let Packet::Connect(ref mut c) = c {
        c.keep_alive = 1;
    }
    let (mut raw, _) = connected(&gw, c, Protocol::V5).await;
    let start = std::time::Instant::now();
    let seen = raw.until_closed().await;
    let waited = start.elapsed();
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::KEEP_ALIVE_TIMEOUT)),
        "{seen:?}"
    );
    assert!(waited >= Duration::from_millis(1400) && waited < Duration::from_secs(3), "{waited:?}");
    // Status events: `connect`, then `tcpclean` with the reason (no `disconnect`: the client sent none).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let backend = gw.gateway().ctx.backend.clone();
    let fetched = backend.fetch(&TopicPartition::new("GID_LMQ_STATUS", 0), 0, 100).await.unwrap();
    let seq: Vec<(String, String)> = fetched
        .records
        .iter()
        .filter_map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.record.value).ok()?;
            (body["clientId"] == "ka").then(|| {
                (
                    body["eventType"].as_str().unwrap_or("").to_string(),
                    body["reason"].as_str().unwrap_or("").to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        seq,
        vec![("connect".to_string(), String::new()), ("tcpclean".to_string(), "keepalive timeout".to_string())]
    );
}

#[tokio::test]
async fn status_events_are_written_for_each_connection() {
    let gw = TestGateway::start().await;
    let c = v4::connect(gw.addr, "GID_ev@@@dev1").await;
    c.disconnect().await;
    let c = v4::connect(gw.addr, "GID_ev@@@dev2").await;
    c.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let backend = gw.gateway().ctx.backend.clone();
    let tp = TopicPartition::new("GID_LMQ_STATUS", 0);
    let fetched = backend.fetch(&tp, 0, 100).await.unwrap();
    let events: Vec<(String, serde_json::Value)> = fetched
        .records
        .iter()
        .map(|r| {
            let t = String::from_utf8(r.record.header("eventType").unwrap().to_vec()).unwrap();
            (t, serde_json::from_slice(&r.record.value).unwrap())
        })
        .collect();
    let of = |id: &str| -> Vec<String> {
        events.iter().filter(|(_, b)| b["clientId"] == id).map(|(t, _)| t.clone()).collect()
    };
    assert_eq!(of("GID_ev@@@dev1"), vec!["connect", "disconnect", "tcpclean"]);
    assert_eq!(of("GID_ev@@@dev2"), vec!["connect", "tcpclean"]);
    for (t, body) in &events {
        assert_eq!(body["eventType"], t.as_str());
        assert_eq!(body["clientIp"], "127.0.0.1");
        assert!(body["time"].as_i64().unwrap() > 1_600_000_000_000);
        assert!(body["channelId"].as_str().is_some_and(|c| !c.is_empty()));
    }
}

#[tokio::test]
async fn offline_p2p_messages_reach_a_persistent_session() {
    let gw = TestGateway::start_with("topics:\n  parents:\n    - name: cmd\n    - name: \"*\"\n").await;
    let mut o = v4::options(gw.addr, "GID_dev@@@p2p1");
    o.set_clean_session(false);
    let dev = v4::connect_with(o.clone()).await;
    dev.disconnect().await;
    let mut app = v4::connect(gw.addr, "p2p-app").await;
    app.publish("cmd/p2p/GID_dev@@@p2p1", v4::QoS::AtLeastOnce, false, b"while offline").await;
    let mut dev = v4::connect_with(o).await;
    assert_eq!(&dev.next_publish().await.payload[..], b"while offline");
}

#[tokio::test]
async fn undeclared_parent_topics_are_refused() {
    let gw = TestGateway::start_with("topics:\n  parents:\n    - name: cmd\n").await;
    let (mut raw, _) = connected(&gw, connect_packet("undeclared", Protocol::V5, true), Protocol::V5).await;
    raw.send(&publish("other/x", QoS::AtLeastOnce, Some(1), b"x")).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::TOPIC_NAME_INVALID));
    raw.send(&subscribe("other/#", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(s)) if s.codes == vec![ReasonCode::TOPIC_FILTER_INVALID]));
    raw.send(&publish("cmd/x", QoS::AtLeastOnce, Some(2), b"x")).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
}

#[tokio::test]
async fn qos0_to_a_stalled_subscriber_is_dropped_and_counted() {
    let gw = TestGateway::start().await;
    let (mut slow, _) = connected(&gw, connect_packet("slow0", Protocol::V311, true), Protocol::V311).await;
    slow.send(&subscribe("q0flood/#", QoS::AtMostOnce)).await;
    assert!(matches!(slow.recv().await, Some(Packet::SubAck(_))));
    let mut fast = v4::connect(gw.addr, "fast0").await;
    fast.subscribe("q0flood/#", v4::QoS::AtMostOnce).await;
    let (mut publ, _) = connected(&gw, connect_packet("flooder0", Protocol::V311, true), Protocol::V311).await;
    // Far more than the stalled client's socket buffers, write buffer and queue can hold.
    let n = 6000usize;
    let body = Bytes::from(vec![b'y'; 8192]);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            // Paced so that a subscriber that reads keeps up; the stalled one cannot.
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            publ.send(&Packet::Publish(p::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "q0flood/x".into(),
                packet_id: None,
                payload: body.clone(),
                properties: Default::default(),
            }))
            .await;
        }
        publ
    });
    let mut got = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), fast.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Incoming::Publish(_))))) => got += 1,
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    let _publ = sender.await.unwrap();
    let dropped = gw.gateway().ctx.router.stats.dropped_qos0.get();
    assert!(dropped > 0, "the stalled subscriber's QoS 0 messages are dropped and counted");
    assert_eq!(got, n, "the reading subscriber gets every message while the other one stalls");
}

#[tokio::test]
async fn takeover_and_shutdown_events_are_written_in_order() {
    let gw = TestGateway::start().await;
    let mut first = v4::connect(gw.addr, "GID_ev@@@take").await;
    let _second = v4::connect(gw.addr, "GID_ev@@@take").await;
    first.closed_by_server().await;
    let mut gw = gw;
    gw.gw.take().unwrap().shutdown().await;
    // Read the events back from the data directory after the shutdown.
    let dir = gw.dir.path().to_path_buf();
    let config =
        lmq_gateway::config::Config::from_yaml(&format!("core:\n  embedded:\n    data_dir: {}\n", dir.display()))
            .unwrap();
    let core =
        lmq_gateway::backend::embedded::EmbeddedCore::open(&config.core.embedded, "GID_LMQ_STATUS").await.unwrap();
    use lmq_gateway::backend::CoreService;
    let fetched = core.fetch(&TopicPartition::new("GID_LMQ_STATUS", 0), 0, 100).await.unwrap();
    let seq: Vec<(String, String)> = fetched
        .records
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap();
            (body["eventType"].as_str().unwrap().to_string(), body["reason"].as_str().unwrap_or("").to_string())
        })
        .collect();
    let types: Vec<&str> = seq.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types, vec!["connect", "tcpclean", "connect", "tcpclean"], "{seq:?}");
    assert_eq!(seq[1].1, "session taken over");
    assert_eq!(seq[3].1, "server shutting down");
}
