//! Bounds on what one client can make the gateway hold (SPEC §8), seen the way an attacker
//! sees them: a client that writes without reading, a subscriber that stops reading (the
//! check of `tests/hostile/bounds.rs`, which `tests/kafka.rs` and `tests/rocketmq.rs` run on
//! the brokers), a SUBSCRIBE repeating one filter thousands of times, retained messages per
//! SUBSCRIBE, a first packet that is not CONNECT, a keepalive-0 client that never speaks, an
//! oversized WebSocket frame before CONNECT.
//!
//! The memory tests run the real binary as a child process and read its resident set size
//! from `/proc/<pid>/status`, so the test's own buffers do not count.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;

use bytes::{Bytes, BytesMut};
use common::process::rss_of;
use common::{connect_packet, v4, GatewayProcess, Raw, TestGateway};
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

for_each_bounds_check!(on_embedded);

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

/// The gateway binary in a child process (its RSS is the gateway's alone), with the admin API
/// for its metrics and `mqtt` as its `mqtt:` section.
fn gateway_process(mqtt: &str) -> GatewayProcess {
    GatewayProcess::options(&format!(
        "core:\n  embedded:\n    data_dir: data\n    fsync: never\n\
         auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n\
         log:\n  level: warn\nmqtt:\n{mqtt}"
    ))
    .admin()
    .start()
}

/// The largest RSS seen while `f` runs, sampled every 20 ms.
async fn peak_rss_during<T>(gw: &GatewayProcess, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let pid = gw.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_of(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let out = f.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    (out, peak)
}

/// Next packet within `d`, or `None` on silence or close.
async fn recv_within(raw: &mut Raw, d: Duration) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if let Ok(Some(p)) = p::decode(&mut raw.buf, raw.protocol, 1 << 20) {
            return Some(p);
        }
        match tokio::time::timeout_at(deadline, raw.stream.read_buf(&mut raw.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether the server closes the connection within `d` (data before the close is ignored).
async fn closed_within(stream: &mut TcpStream, d: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

async fn connected_raw(addr: SocketAddr, id: &str, protocol: Protocol) -> Raw {
    let mut raw = Raw::connect(addr, protocol).await;
    raw.send(&connect_packet(id, protocol, true)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw
}

fn subscribe_packet(filters: Vec<(String, QoS)>) -> Packet {
    Packet::Subscribe(p::Subscribe {
        packet_id: pid(1),
        filters: filters
            .into_iter()
            .map(|(f, qos)| (f, p::SubscriptionOptions { qos, ..Default::default() }))
            .collect(),
        properties: Default::default(),
    })
}

const MIB: u64 = 1 << 20;

/// 32 MiB of PINGREQ from a client that never reads: the gateway stops reading it once
/// 1 MiB of answers wait, disconnects it 2 s later, and meanwhile neither its memory nor
/// another client's latency notices.
#[tokio::test]
async fn a_client_that_never_reads_is_paused_then_disconnected() {
    let gw = gateway_process("  max_output_buffer_bytes: 1048576\n  write_stall_timeout_secs: 2\n");

    // Normal clients: one publishes, one receives; the round trip is measured.
    let mut normal = v4::connect(gw.addr, "normal").await;
    normal.subscribe("live/#", v4::QoS::AtLeastOnce).await;
    let mut normal_pub = v4::connect(gw.addr, "normal-pub").await;
    normal_pub.publish("live/warmup", v4::QoS::AtLeastOnce, false, b"warm").await;
    normal.next_publish().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.rss();

    // The flooder: small socket buffers on its side, so what the kernel holds is mostly
    // the gateway's (and is not the gateway's RSS anyway).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.set_send_buffer_size(64 * 1024).unwrap();
    let stream = sock.connect(gw.addr).await.unwrap();
    let mut flooder = Raw { stream, buf: BytesMut::new(), protocol: Protocol::V311 };
    flooder.send(&connect_packet("flooder", Protocol::V311, true)).await;
    assert!(matches!(flooder.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));

    const TOTAL: usize = 32 << 20;
    let start = Instant::now();
    let flood = tokio::spawn(async move {
        let chunk = [0xC0u8, 0x00].repeat(32 * 1024); // 32768 PINGREQs
        let (mut written, mut last_ok) = (0usize, Instant::now());
        let result = loop {
            if written >= TOTAL {
                break Ok(());
            }
            match tokio::time::timeout(Duration::from_secs(30), flooder.stream.write_all(&chunk)).await {
                Ok(Ok(())) => {
                    written += chunk.len();
                    last_ok = Instant::now();
                }
                Ok(Err(e)) => break Err(e.to_string()),
                Err(_) => break Err("still blocked after 30 s".to_string()),
            }
        };
        (written, last_ok, Instant::now(), result)
    });

    let ((written, last_ok, ended, result), peak) = peak_rss_during(&gw, async {
        // Meanwhile the normal client publishes and receives with normal latency.
        let mut worst = Duration::ZERO;
        let mut n = 0;
        while !flood.is_finished() {
            let t = Instant::now();
            normal_pub.publish(&format!("live/{n}"), v4::QoS::AtLeastOnce, false, b"ping").await;
            let got = normal.next_publish().await;
            assert_eq!(got.topic, format!("live/{n}"));
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(n >= 10, "the normal client got only {n} round trips");
        assert!(worst < Duration::from_secs(1), "normal client's worst round trip {worst:?}");
        flood.await.unwrap()
    })
    .await;

    let growth = peak.saturating_sub(before);
    assert!(growth < 16 * MIB, "gateway RSS grew by {} MiB (before {} MiB)", growth / MIB, before / MIB);
    // The writer was blocked: its writes stopped completing well before the end …
    assert!(written < TOTAL, "all {written} bytes were accepted: nothing pushed back");
    assert!(
        ended - last_ok >= Duration::from_secs(1),
        "writes kept completing until {:?} before the end",
        ended - last_ok
    );
    // … and the gateway disconnected it after the stall timeout, not before.
    assert!(result.is_err(), "the flooder was never disconnected");
    let took = ended - start;
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(15), "disconnected after {took:?}");
    assert!(gw.metric("lmq_connections_closed_total", &[("reason", "slow_reader")]).await >= 1.0);
    assert!(gw.metric("lmq_limit_refusals_total", &[("reason", "slow_reader")]).await >= 1.0);

    // The normal client is still fine afterwards.
    normal_pub.publish("live/after", v4::QoS::AtLeastOnce, false, b"after").await;
    assert_eq!(normal.next_publish().await.topic, "live/after");
}

/// One SUBSCRIBE repeating a filter 3,000 times over 100 retained messages: one SUBACK code
/// per copy, each retained message once, one subscription against the quota, bounded memory.
#[tokio::test]
async fn a_filter_repeated_in_one_subscribe_is_one_subscription() {
    let gw = gateway_process("  max_output_buffer_bytes: 1048576\n");
    let mut publisher = v4::connect(gw.addr, "retainer").await;
    let payload = vec![b'r'; 1024];
    for i in 0..100 {
        publisher.publish(&format!("dup/{i:03}"), v4::QoS::AtLeastOnce, true, &payload).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.rss();

    let mut raw = connected_raw(gw.addr, "repeater", Protocol::V311).await;
    const COPIES: usize = 3000;
    let mut filters: Vec<(String, QoS)> = (0..COPIES).map(|_| ("dup/#".to_string(), QoS::AtLeastOnce)).collect();
    // The last copy's options win: QoS 0, so the retained messages come without packet ids.
    if let Some(last) = filters.last_mut() {
        last.1 = QoS::AtMostOnce;
    }
    let (received, peak) = peak_rss_during(&gw, async {
        raw.send(&subscribe_packet(filters)).await;
        match raw.recv().await {
            Some(Packet::SubAck(s)) => {
                assert_eq!(s.codes.len(), COPIES, "one code per requested filter");
                assert!(s.codes.iter().all(|c| *c == ReasonCode::GRANTED_QOS_0), "{:?}", &s.codes[..3]);
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
        let mut topics = Vec::new();
        while let Some(p) = recv_within(&mut raw, Duration::from_millis(1500)).await {
            match p {
                Packet::Publish(p) => {
                    assert!(p.retain && p.qos == QoS::AtMostOnce, "retained at QoS 0 (the last copy's options)");
                    topics.push(p.topic);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        topics
    })
    .await;
    let mut distinct = received.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 100, "every retained message");
    assert_eq!(received.len(), 100, "each retained message once, not once per copy");
    let growth = peak.saturating_sub(before);
    assert!(growth < 16 * MIB, "gateway RSS grew by {} MiB", growth / MIB);

    // The repeated filter holds one of the 30 subscriptions: 29 more fit, the 31st does not.
    raw.send(&subscribe_packet((0..29).map(|i| (format!("other/{i}"), QoS::AtLeastOnce)).collect())).await;
    match recv_within(&mut raw, Duration::from_secs(5)).await {
        Some(Packet::SubAck(s)) => assert!(s.codes.iter().all(|c| *c == ReasonCode::GRANTED_QOS_1), "{:?}", s.codes),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A re-SUBSCRIBE of a held filter replaces it and is not counted again …
    raw.send(&subscribe_packet(vec![("other/0".into(), QoS::AtMostOnce), ("other/0".into(), QoS::AtLeastOnce)])).await;
    match recv_within(&mut raw, Duration::from_secs(5)).await {
        Some(Packet::SubAck(s)) => assert_eq!(s.codes, vec![ReasonCode::GRANTED_QOS_1; 2]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // … but a new one is the 31st: 3.1.1 gets 0x80 for each of its copies.
    raw.send(&subscribe_packet(vec![("new/one".into(), QoS::AtLeastOnce), ("new/one".into(), QoS::AtMostOnce)])).await;
    match recv_within(&mut raw, Duration::from_secs(5)).await {
        Some(Packet::SubAck(s)) => {
            assert_eq!(s.codes.len(), 2);
            assert!(s.codes.iter().all(|c| c.is_error()), "{:?}", s.codes);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// With `max_retained_per_subscribe: 10` and 50 retained messages, a `#` subscriber gets
/// the first 10 in topic order, then live messages as usual.
#[tokio::test]
async fn retained_messages_per_subscribe_are_capped() {
    let gw = TestGateway::start_with("mqtt:\n  max_retained_per_subscribe: 10\n").await;
    let mut publisher = v4::connect(gw.addr, "cap-pub").await;
    for i in (0..50).rev() {
        publisher.publish(&format!("cap/{i:02}"), v4::QoS::AtLeastOnce, true, format!("r{i}").as_bytes()).await;
    }
    let mut sub = connected_raw(gw.addr, "cap-sub", Protocol::V311).await;
    sub.send(&subscribe_packet(vec![("#".into(), QoS::AtMostOnce)])).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut topics = Vec::new();
    while let Some(p) = recv_within(&mut sub, Duration::from_millis(800)).await {
        match p {
            Packet::Publish(p) if p.retain => topics.push(p.topic),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<String> = (0..10).map(|i| format!("cap/{i:02}")).collect();
    assert_eq!(topics, expected, "the first 10 retained messages in topic order");
    assert!(gw.gateway().ctx.limits.refused(lmq_gateway::limits::Refusal::RetainedPerSubscribe) >= 1);

    publisher.publish("cap/live", v4::QoS::AtLeastOnce, false, b"live").await;
    match recv_within(&mut sub, Duration::from_secs(5)).await {
        Some(Packet::Publish(p)) => {
            assert_eq!((p.topic.as_str(), &p.payload[..], p.retain), ("cap/live", &b"live"[..], false))
        }
        other => panic!("expected the live message, got {other:?}"),
    }
}

/// A first packet that is not CONNECT closes the connection as soon as its first byte is
/// there, not when its (announced, never sent) body would be complete or at the CONNECT
/// timeout [MQTT-3.1.0-1].
#[tokio::test]
async fn a_first_packet_that_is_not_connect_closes_at_once() {
    let gw = TestGateway::start_with("mqtt:\n  connect_timeout_secs: 10\n").await;
    for first in [
        vec![0x30, 0xE8, 0x07, 0x00, 0x03, b'a', b'/', b'b'], // PUBLISH announcing 1000 bytes
        vec![0x82, 0x80, 0x80, 0x04],                         // SUBSCRIBE announcing 64 KiB
        vec![0xC0],                                           // PINGREQ's first byte alone
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&first).await.unwrap();
        let t = Instant::now();
        assert!(closed_within(&mut s, Duration::from_millis(500)).await, "{first:02x?} left open");
        assert!(t.elapsed() < Duration::from_millis(500));
    }
    // A CONNECT still gets its time.
    let mut raw = connected_raw(gw.addr, "after", Protocol::V311).await;
    raw.send(&Packet::PingReq).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)));
}

/// An MQTT 3.1.1 client with keepalive 0 is closed after the configured idle time; one
/// that keeps talking is not.
#[tokio::test]
async fn keepalive_0_gets_the_idle_limit() {
    let gw = TestGateway::start_with("mqtt:\n  idle_timeout_secs_when_keepalive_0: 1\n").await;
    let connect = |id: &str| {
        let mut c = connect_packet(id, Protocol::V311, true);
        if let Packet::Connect(c) = &mut c {
            c.keep_alive = 0;
        }
        c
    };
    let mut silent = Raw::connect(gw.addr, Protocol::V311).await;
    silent.send(&connect("silent")).await;
    assert!(matches!(silent.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    let mut talker = Raw::connect(gw.addr, Protocol::V311).await;
    talker.send(&connect("talker")).await;
    assert!(matches!(talker.recv().await, Some(Packet::ConnAck(_))));

    let t = Instant::now();
    let talking = tokio::spawn(async move {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            talker.send(&Packet::PingReq).await;
            assert!(matches!(talker.recv().await, Some(Packet::PingResp)), "the talking client stays");
        }
    });
    assert!(closed_within(&mut silent.stream, Duration::from_secs(4)).await, "the silent client was not closed");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "closed after {took:?}");
    talking.await.unwrap();
}

/// Before CONNECT, a WebSocket frame announcing more than the largest MQTT packet is
/// refused from its header: the connection closes at once, without waiting for (and
/// buffering) its payload.
#[tokio::test]
async fn an_oversized_websocket_frame_before_connect_is_refused_from_its_header() {
    let gw = TestGateway::start_with_listeners("  - name: ws\n    bind: 127.0.0.1:0\n    transport: ws\n", "").await;
    let max_packet = gw.gateway().ctx.limits.max_packet_size();
    let ws = gw.listener("ws");
    let mut s = TcpStream::connect(ws).await.unwrap();
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: {ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "upgrade answered");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));

    // A masked binary frame announcing max_packet + 1 bytes (under the 1 MiB the gateway
    // used to accept), then only the start of its payload.
    let announced = (max_packet + 1) as u64;
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&announced.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]); // mask
    frame.extend_from_slice(&[0x10, 0x00, 0x00, 0x00]);
    s.write_all(&frame).await.unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(1)).await, "the gateway waited for the frame's payload");
    assert!(t.elapsed() < Duration::from_secs(1));

    // A frame of a normal size still carries a CONNECT.
    let url = format!("ws://{ws}/mqtt");
    let tcp = TcpStream::connect(ws).await.unwrap();
    let (mut c, _) = tokio_tungstenite::client_async(url.as_str().with_mqtt(), tcp).await.expect("upgrade");
    use futures::{SinkExt, StreamExt};
    let mut b = BytesMut::new();
    p::encode(&connect_packet("ws-ok", Protocol::V311, true), Protocol::V311, &mut b).unwrap();
    c.send(tokio_tungstenite::tungstenite::Message::Binary(b.freeze())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), c.next()).await {
        Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(m)))) => {
            let mut m = BytesMut::from(&m[..]);
            assert!(matches!(p::decode(&mut m, Protocol::V311, 1 << 20), Ok(Some(Packet::ConnAck(_)))));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A request for `ws://…/mqtt` with subprotocol `mqtt`.
trait WithMqtt {
    fn with_mqtt(self) -> tokio_tungstenite::tungstenite::handshake::client::Request;
}

impl WithMqtt for &str {
    fn with_mqtt(self) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut r = self.into_client_request().unwrap();
        r.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        r
    }
}

/// A topic alias is checked against Topic Alias Maximum, and a mapping is stored only for a
/// topic that passed the checks: an alias set by a refused PUBLISH stays unknown.
#[tokio::test]
async fn topic_aliases_are_checked_before_they_are_stored() {
    let gw = TestGateway::start().await;
    let publish = |topic: &str, alias: u16, id: u16| {
        let properties = p::PublishProperties { topic_alias: Some(alias), ..Default::default() };
        Packet::Publish(p::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(pid(id)),
            payload: Bytes::from_static(b"x"),
            properties,
        })
    };
    // Too long a topic: refused with 0x90, and its alias is not stored.
    let mut raw = connected_raw(gw.addr, "alias-1", Protocol::V5).await;
    raw.send(&publish(&format!("a/{}", "x".repeat(80)), 1, 1)).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::TOPIC_NAME_INVALID),
        other => panic!("expected PUBACK 0x90, got {other:?}"),
    }
    raw.send(&publish("", 1, 2)).await;
    let seen = raw.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::PROTOCOL_ERROR)),
        "the alias of a refused PUBLISH is unknown: {seen:?}"
    );
    // Above Topic Alias Maximum (32): 0x94.
    let mut raw = connected_raw(gw.addr, "alias-2", Protocol::V5).await;
    raw.send(&publish("a/b", 33, 1)).await;
    let seen = raw.until_closed().await;
    assert!(seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::TOPIC_ALIAS_INVALID)));
    // A valid one works both ways.
    let mut raw = connected_raw(gw.addr, "alias-3", Protocol::V5).await;
    raw.send(&publish("a/b", 5, 1)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
    raw.send(&publish("", 5, 2)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
}

/// The retained store every gateway holds is bounded: a retained PUBLISH to a new topic beyond
/// `limits.max_retained_messages` is refused (MQTT 5: 0x97), replacing or deleting one is not.
#[tokio::test]
async fn the_retained_store_is_bounded() {
    let gw = TestGateway::start_with("limits:\n  max_retained_messages: 3\n").await;
    let mut c = connected_raw(gw.addr, "ret-pub", Protocol::V5).await;
    let mut id = 0u16;
    let mut publish = |topic: &str, payload: &'static [u8]| {
        id += 1;
        Packet::Publish(p::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic.into(),
            packet_id: NonZeroU16::new(id),
            payload: Bytes::from_static(payload),
            properties: Default::default(),
        })
    };
    let mut results = Vec::new();
    for (topic, payload) in [
        ("ret/1", &b"a"[..]),
        ("ret/2", b"b"),
        ("ret/3", b"c"),
        ("ret/4", b"d"),
        ("ret/1", b"a2"),
        ("ret/2", b""),
        ("ret/4", b"d2"),
    ] {
        c.send(&publish(topic, payload)).await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => results.push((topic, a.code)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    let ok = ReasonCode::SUCCESS;
    assert_eq!(
        results,
        vec![
            ("ret/1", ok),
            ("ret/2", ok),
            ("ret/3", ok),
            ("ret/4", ReasonCode::QUOTA_EXCEEDED),
            ("ret/1", ok),
            ("ret/2", ok),
            ("ret/4", ok)
        ],
        "the fourth topic is refused until one is deleted"
    );
    assert!(gw.gateway().ctx.limits.refused(lmq_gateway::limits::Refusal::RetainedStoreFull) >= 1);
    let mut sub = connected_raw(gw.addr, "ret-sub", Protocol::V311).await;
    sub.send(&subscribe_packet(vec![("ret/#".into(), QoS::AtMostOnce)])).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let mut got = Vec::new();
    while let Some(Packet::Publish(p)) = recv_within(&mut sub, Duration::from_millis(800)).await {
        got.push((p.topic, p.payload));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("ret/1".to_string(), Bytes::from_static(b"a2")),
            ("ret/3".to_string(), Bytes::from_static(b"c")),
            ("ret/4".to_string(), Bytes::from_static(b"d2"))
        ]
    );
}

/// The allocator asks the kernel for transparent huge pages, and the kernel zeroing a fresh
/// 2 MiB page held a runtime thread for about 10 ms in the middle of deliveries: the gateway
/// turns them off for its process at start (docs/benchmarks.md). An operator sees that in
/// `/proc/<pid>/status`.
#[test]
fn the_gateway_process_runs_without_transparent_huge_pages() {
    let gw = GatewayProcess::options(
        "core:\n  embedded:\n    data_dir: data\n    fsync: never\nauth:\n  allow_anonymous: true\n",
    )
    .start();
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("THP_enabled:")).expect("THP_enabled in /proc/<pid>/status");
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
