//! Metrics on the admin port move when their events happen: real MQTT clients act, the test
//! reads `/metrics` over HTTP like Prometheus does.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{connect_packet, http, v4, v5, Raw, TestGateway, WAIT};
use lmq_gateway::auth::signature::sign;
use lmq_gateway::protocol::{self as p, Packet, Protocol, PubResponse, QoS, ReasonCode};
use std::num::NonZeroU16;
use std::time::Duration;

const TCP: [(&str, &str); 2] = [("listener", "tcp"), ("transport", "tcp")];

fn publish(topic: &str, qos: QoS, id: Option<u16>, payload: Bytes) -> Packet {
    Packet::Publish(p::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: id.and_then(NonZeroU16::new),
        payload,
        properties: Default::default(),
    })
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap_or(NonZeroU16::MIN),
        filters: vec![(filter.into(), p::SubscriptionOptions { qos, ..Default::default() })],
        properties: Default::default(),
    })
}

async fn raw_connected(gw: &TestGateway, id: &str, protocol: Protocol) -> Raw {
    let mut raw = Raw::connect(gw.addr, protocol).await;
    raw.send(&connect_packet(id, protocol, true)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    raw
}

#[tokio::test]
async fn metrics_are_served_without_the_token_and_use_lmq_names() {
    let gw = TestGateway::start_admin("").await;
    let url = format!("{}/metrics", gw.admin_url());
    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(line["# TYPE ".len()..].starts_with("lmq_"), "{line}");
    }
    // Process metrics of the gateway itself.
    assert!(common::metric_value(&text, "lmq_process_open_fds", &[]) > 0.0, "{text}");
    assert!(common::metric_value(&text, "lmq_process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(common::metric_value(&text, "lmq_core_available", &[]), 1.0);
}

/// Sample lines of metric `name` (exactly that name) in Prometheus text.
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .collect()
}

#[tokio::test]
async fn every_dashboard_query_has_series_before_any_client_connects() {
    let ws = "  - name: ws\n    bind: 127.0.0.1:0\n    transport: ws\n";
    // A declared parent topic besides `*`: the backlog panels show it (at zero) from the start.
    let extra =
        "admin:\n  enabled: true\n  bind: 127.0.0.1:0\ntopics:\n  parents:\n    - name: \"*\"\n    - name: plant\n";
    let gw = TestGateway::start_with_listeners(ws, extra).await;
    // What Prometheus scrapes right after start: no client has connected yet.
    let r = http().get(format!("{}/metrics", gw.admin_url())).send().await.unwrap();
    assert_eq!(r.status(), 200, "/metrics needs no token");
    let text = r.text().await.unwrap();

    // Every metric a Grafana panel queries has samples already.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards/lmq-gateway.json")).unwrap(),
    )
    .unwrap();
    for expr in dashboard["panels"].as_array().unwrap().iter().flat_map(|p| p["targets"].as_array().unwrap()) {
        let expr = expr["expr"].as_str().unwrap();
        // The top-sessions panels list sessions with a backlog: none before traffic.
        let names = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for name in names.filter(|w| w.starts_with("lmq_") && !w.starts_with("lmq_session_backlog_")) {
            assert!(!samples(&text, name).is_empty(), "`{expr}`: no {name} samples before traffic:\n{text}");
        }
    }

    // The labelled ones at zero, for each known label value.
    for (name, labels) in [
        ("lmq_connections", vec![("listener", "tcp"), ("transport", "tcp")]),
        ("lmq_connections", vec![("listener", "ws"), ("transport", "ws")]),
        ("lmq_connections_opened_total", vec![("listener", "ws"), ("transport", "ws")]),
        ("lmq_connections_closed_total", vec![("listener", "tcp"), ("reason", "client_disconnect")]),
        ("lmq_connections_closed_total", vec![("listener", "ws"), ("reason", "keepalive_timeout")]),
        ("lmq_connect_total", vec![("code", "0x00")]),
        ("lmq_connect_total", vec![("code", "0x86")]),
        ("lmq_auth_failures_total", vec![("mode", "signature"), ("reason", "bad_signature")]),
        ("lmq_auth_failures_total", vec![("mode", "token"), ("reason", "expired_token")]),
        ("lmq_limit_refusals_total", vec![("reason", "reserved_topic")]),
        ("lmq_backlog_messages", vec![("parent_topic", "plant"), ("sessions", "offline")]),
        ("lmq_backlog_delay_seconds", vec![("parent_topic", "plant"), ("sessions", "connected")]),
        ("lmq_events_written_total", vec![("type", "connect")]),
    ] {
        let found = samples(&text, name)
            .into_iter()
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .collect::<Vec<_>>();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        assert!(found[0].ends_with(" 0"), "{}", found[0]);
    }
    for direction in ["in", "out"] {
        for qos in ["0", "1", "2"] {
            let labels = [("direction", direction), ("qos", qos)];
            let line = samples(&text, "lmq_messages_total")
                .into_iter()
                .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))));
            assert!(line.is_some_and(|l| l.ends_with(" 0")), "lmq_messages_total{labels:?}: {line:?}");
        }
    }
    // Only the configured listeners: no series for listeners that do not exist.
    assert!(samples(&text, "lmq_connections")
        .iter()
        .all(|l| l.contains("listener=\"tcp\"") || l.contains("listener=\"ws\"")));
}

#[tokio::test]
async fn connections_are_counted_by_listener_and_close_reason() {
    let gw = TestGateway::start_admin("").await;
    assert_eq!(gw.metric("lmq_connections", &TCP).await, 0.0);
    let a = v4::connect(gw.addr, "m-conn-a").await;
    let b = v5::connect(gw.addr, "m-conn-b").await;
    gw.wait_metric("lmq_connections", &TCP, |v| v == 2.0).await;
    assert_eq!(gw.metric("lmq_connections_opened_total", &TCP).await, 2.0);
    assert_eq!(gw.metric("lmq_connect_total", &[("code", "0x00")]).await, 2.0);
    gw.wait_metric("lmq_events_written_total", &[("type", "connect")], |v| v == 2.0).await;

    a.disconnect().await;
    gw.wait_metric("lmq_connections_closed_total", &[("reason", "client_disconnect")], |v| v == 1.0).await;
    gw.wait_metric("lmq_events_written_total", &[("type", "disconnect")], |v| v == 1.0).await;
    b.kill();
    gw.wait_metric("lmq_connections_closed_total", &[("reason", "connection_lost")], |v| v == 1.0).await;
    gw.wait_metric("lmq_connections", &TCP, |v| v == 0.0).await;
    gw.wait_metric("lmq_events_written_total", &[("type", "tcpclean")], |v| v == 2.0).await;
    assert_eq!(gw.metric("lmq_event_errors_total", &[]).await, 0.0);
}

#[tokio::test]
async fn refused_connects_and_auth_failures_are_counted_by_code_and_mode() {
    let auth =
        "auth:\n  access_keys:\n    - id: ak-m\n      secret: s-m\n      publish: [\"#\"]\n      subscribe: [\"#\"]\n";
    let gw = TestGateway::start_admin(auth).await;
    let id = "GID_metrics@@@d1";
    let connect = |user: &str, pw: &str| {
        Packet::Connect(Box::new(p::Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive: 30,
            client_id: id.into(),
            will: None,
            username: Some(user.into()),
            password: Some(Bytes::copy_from_slice(pw.as_bytes())),
            properties: Default::default(),
        }))
    };
    for (user, pw) in [("Signature|ak-m|i", sign("wrong", id)), ("Token|ak-m|i", "R|not-a-jwt".into())] {
        let mut raw = Raw::connect(gw.addr, Protocol::V5).await;
        raw.send(&connect(user, &pw)).await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::BAD_USER_NAME_OR_PASSWORD)
        );
    }
    let mut ok = Raw::connect(gw.addr, Protocol::V5).await;
    ok.send(&connect("Signature|ak-m|i", &sign("s-m", id))).await;
    assert!(matches!(ok.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));

    assert_eq!(gw.metric("lmq_auth_failures_total", &[("mode", "signature"), ("reason", "bad_signature")]).await, 1.0);
    assert_eq!(gw.metric("lmq_auth_failures_total", &[("mode", "token")]).await, 1.0);
    assert_eq!(gw.metric("lmq_connect_total", &[("code", "0x86")]).await, 2.0);
    assert_eq!(gw.metric("lmq_connect_total", &[("code", "0x00")]).await, 1.0);
    gw.wait_metric("lmq_connections_closed_total", &[("reason", "connect_refused")], |v| v == 2.0).await;
}

#[tokio::test]
async fn messages_bytes_latency_and_routing_are_counted() {
    let gw = TestGateway::start_admin("").await;
    let mut sub = v4::connect(gw.addr, "m-sub").await;
    sub.subscribe("mq/#", v4::QoS::ExactlyOnce).await;
    let bytes_out_before = gw.metric("lmq_bytes_total", &[("direction", "out")]).await;
    let mut publ = v4::connect(gw.addr, "m-pub").await;
    publ.publish("mq/0", v4::QoS::AtMostOnce, false, b"zero").await;
    publ.publish("mq/1", v4::QoS::AtLeastOnce, false, b"one").await;
    publ.publish("mq/2", v4::QoS::ExactlyOnce, false, b"two").await;
    for _ in 0..3 {
        sub.next_publish().await;
    }
    for q in ["0", "1", "2"] {
        gw.wait_metric("lmq_messages_total", &[("direction", "in"), ("qos", q)], |v| v == 1.0).await;
        gw.wait_metric("lmq_messages_total", &[("direction", "out"), ("qos", q)], |v| v == 1.0).await;
    }
    assert!(gw.metric("lmq_bytes_total", &[("direction", "in")]).await > 0.0);
    assert!(gw.metric("lmq_bytes_total", &[("direction", "out")]).await > bytes_out_before);
    // Every append is timed, QoS 0 included (its append is awaited though nothing is sent back).
    gw.wait_metric("lmq_core_append_duration_seconds_count", &[], |v| v == 3.0).await;
    assert!(gw.metric("lmq_routed_records_total", &[]).await >= 3.0);
    assert_eq!(gw.metric("lmq_core_append_errors_total", &[]).await, 0.0);
}

#[tokio::test]
async fn subscriptions_inflight_and_retained_gauges_follow_the_clients() {
    let gw = TestGateway::start_admin("").await;
    let mut raw = raw_connected(&gw, "m-gauge", Protocol::V311).await;
    raw.send(&subscribe("g/#", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    raw.send(&subscribe("h/+", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    gw.wait_metric("lmq_subscriptions", &[], |v| v == 2.0).await;

    // A QoS 1 message the client does not acknowledge stays in flight.
    let mut publ = v4::connect(gw.addr, "m-gauge-pub").await;
    publ.publish("g/1", v4::QoS::AtLeastOnce, true, b"kept").await;
    let Some(Packet::Publish(m)) = raw.recv().await else { panic!("no delivery") };
    gw.wait_metric("lmq_inflight_messages", &[], |v| v == 1.0).await;
    assert_eq!(gw.metric("lmq_retained_messages", &[]).await, 1.0);
    raw.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap_or(NonZeroU16::MIN)))).await;
    gw.wait_metric("lmq_inflight_messages", &[], |v| v == 0.0).await;

    raw.send(&Packet::Unsubscribe(p::Unsubscribe {
        packet_id: NonZeroU16::MIN,
        filters: vec!["h/+".into()],
        user_properties: Default::default(),
    }))
    .await;
    gw.wait_metric("lmq_subscriptions", &[], |v| v == 1.0).await;
    drop(raw);
    gw.wait_metric("lmq_subscriptions", &[], |v| v == 0.0).await;
    assert_eq!(gw.metric("lmq_queued_messages", &[]).await, 0.0);
}

#[tokio::test]
async fn limit_refusals_are_counted_by_reason() {
    let gw = TestGateway::start_admin("").await;
    let mut raw = raw_connected(&gw, "m-limit", Protocol::V5).await;
    let long = format!("lim/{}", "x".repeat(80));
    raw.send(&publish(&long, QoS::AtLeastOnce, Some(1), Bytes::from_static(b"x"))).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::TOPIC_NAME_INVALID));
    assert_eq!(gw.metric("lmq_limit_refusals_total", &[("reason", "topic_too_long")]).await, 1.0);
    assert_eq!(gw.metric("lmq_limit_refusals_total", &[("reason", "payload_too_large")]).await, 0.0);
    raw.send(&publish("lim/big", QoS::AtMostOnce, None, Bytes::from(vec![0u8; 70_000]))).await;
    raw.until_closed().await;
    assert_eq!(gw.metric("lmq_limit_refusals_total", &[("reason", "payload_too_large")]).await, 1.0);
    gw.wait_metric("lmq_connections_closed_total", &[("reason", "limit")], |v| v == 1.0).await;
}

#[tokio::test]
async fn stalled_subscribers_show_drops_and_lag() {
    let gw = TestGateway::start_admin("mqtt:\n  queue_capacity: 4\n").await;
    let mut slow = raw_connected(&gw, "m-slow", Protocol::V311).await;
    slow.send(&subscribe("st/#", QoS::AtLeastOnce)).await;
    assert!(matches!(slow.recv().await, Some(Packet::SubAck(_))));
    // The only member of a share group, stalled too.
    let mut member = raw_connected(&gw, "m-member", Protocol::V311).await;
    member.send(&subscribe("$share/g/st/#", QoS::AtLeastOnce)).await;
    assert!(matches!(member.recv().await, Some(Packet::SubAck(_))));
    let mut publ = raw_connected(&gw, "m-flood", Protocol::V311).await;
    let body = Bytes::from(vec![b'z'; 32 * 1024]);
    // QoS 0 and QoS 1 until the stalled subscriber's queue overflows both ways; QoS 1 in
    // rounds within the receive window.
    let deadline = tokio::time::Instant::now() + WAIT * 4;
    let mut round = 0u16;
    loop {
        round += 1;
        for i in 1..=50u16 {
            publ.send(&publish("st/0", QoS::AtMostOnce, None, body.clone())).await;
            publ.send(&publish("st/1", QoS::AtLeastOnce, Some(i), body.clone())).await;
        }
        for _ in 0..50 {
            assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
        }
        let text = gw.metrics_text().await;
        let drops = common::metric_value(&text, "lmq_dropped_qos0_messages_total", &[]);
        let lag = common::metric_value(&text, "lmq_subscriber_lag_events_total", &[]);
        let shared = common::metric_value(&text, "lmq_dropped_shared_messages_total", &[]);
        if drops > 0.0 && lag > 0.0 && shared > 0.0 {
            assert!(common::metric_value(&text, "lmq_inflight_messages", &[]) > 0.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no drop or lag after {round} rounds");
    }
    drop(slow);
    drop(member);
    tokio::time::sleep(Duration::from_millis(50)).await;
    gw.wait_metric("lmq_queued_messages", &[], |v| v == 0.0).await;
}

#[tokio::test]
async fn messages_beyond_the_inflight_window_are_queued() {
    let gw = TestGateway::start_admin("mqtt:\n  max_inflight: 2\n").await;
    let mut raw = raw_connected(&gw, "m-window", Protocol::V311).await;
    raw.send(&subscribe("w/#", QoS::AtLeastOnce)).await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let mut publ = v4::connect(gw.addr, "m-window-pub").await;
    for i in 0..5u8 {
        publ.publish("w/x", v4::QoS::AtLeastOnce, false, &[i]).await;
    }
    // The client reads but does not acknowledge: 2 in flight, 3 wait.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let Some(Packet::Publish(m)) = raw.recv().await else { panic!("no delivery") };
        ids.extend(m.packet_id);
    }
    gw.wait_metric("lmq_inflight_messages", &[], |v| v == 2.0).await;
    gw.wait_metric("lmq_queued_messages", &[], |v| v == 3.0).await;
    for id in ids {
        raw.send(&Packet::PubAck(PubResponse::new(id))).await;
    }
    for _ in 0..3 {
        let Some(Packet::Publish(m)) = raw.recv().await else { panic!("no delivery") };
        raw.send(&Packet::PubAck(PubResponse::new(m.packet_id.unwrap_or(NonZeroU16::MIN)))).await;
    }
    gw.wait_metric("lmq_queued_messages", &[], |v| v == 0.0).await;
    gw.wait_metric("lmq_inflight_messages", &[], |v| v == 0.0).await;
}

/// A persistent subscriber receiving a steady stream is saved once per checkpoint interval
/// (`mqtt.session_checkpoint_ms`), not once per message, and its positions still move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_persistent_session_is_saved_once_per_checkpoint_interval() {
    let gw = TestGateway::start_admin("mqtt:\n  session_checkpoint_ms: 500\n").await;
    let mut opts = v4::options(gw.addr, "busy-sub");
    opts.set_clean_session(false);
    let mut sub = v4::connect_with(opts).await;
    sub.subscribe("busy/#", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(gw.addr, "busy-pub").await;
    // Settle: the subscription's save is done.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = gw.metric("lmq_session_saves_total", &[]).await;

    // 3 s at about 50 messages per second, each acknowledged by the subscriber.
    let started = tokio::time::Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(3) {
        publisher.publish("busy/a", v4::QoS::AtLeastOnce, false, n.to_string().as_bytes()).await;
        assert_eq!(sub.next_publish().await.payload, n.to_string().as_bytes());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let saves = gw.metric("lmq_session_saves_total", &[]).await - before;
    let intervals = elapsed.as_millis() as f64 / 500.0;
    assert!(n >= 30, "the stream ran ({n} messages)");
    assert!(saves >= 2.0, "the session's positions are saved while it receives ({saves} saves)");
    assert!(
        saves <= intervals + 2.0,
        "{saves} saves for {n} messages in {elapsed:?}: at most one per 500 ms checkpoint"
    );
    publisher.disconnect().await;
    sub.disconnect().await;
}
