//! LMQ's legacy offline pull (SPEC §10): a persistent subscriber that returns and publishes
//! `$SYS/getOfflineMsg` gets its offline messages only on request, at most 30 per request,
//! at most 5 requests per second, oldest or newest first; what it does not acknowledge stays
//! its own; a client that does not pull gets its backlog pushed as before.

use crate::common::Raw;
use crate::hostile::{unique, OPEN_AUTH};
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::num::NonZeroU16;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

use super::Core;

/// The window a returning session waits for a pull request: long enough for a loaded test
/// machine to send one, short enough to see a client that does not pull served.
const WINDOW_MS: u64 = 1500;
const CONFIG: &str = "mqtt:\n  offline_pull_window_ms: 1500\n";
const BACKLOG: u32 = 100;
const GET: &str = "$SYS/getOfflineMsg";

fn connect(id: &str, clean: bool, protocol: Protocol) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: match protocol {
            Protocol::V5 => p::ConnectProperties { session_expiry_interval: Some(3600), ..Default::default() },
            _ => Default::default(),
        },
    }))
}

/// The next packet within `d`, or `None` (nothing came, or the connection closed).
async fn next_within(raw: &mut Raw, d: Duration) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if let Ok(Some(packet)) = p::decode(&mut raw.buf, raw.protocol, 1 << 20) {
            return Some(packet);
        }
        match tokio::time::timeout_at(deadline, raw.stream.read_buf(&mut raw.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

/// Connect; the CONNACK's session-present flag.
async fn open(addr: std::net::SocketAddr, id: &str, clean: bool, protocol: Protocol) -> (Raw, bool) {
    let mut raw = Raw::connect(addr, protocol).await;
    raw.send(&connect(id, clean, protocol)).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS => (raw, a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A persistent subscriber to `topic` goes offline, then `BACKLOG` QoS 1 messages
/// ("000", "001" …) are published to it.
async fn backlog(gw: &Gateway, id: &str, topic: &str, protocol: Protocol) {
    let (mut sub, _) = open(gw.addr(), id, true, protocol).await;
    if protocol != Protocol::V5 {
        // MQTT 3.1.1: a persistent session is cleanSession = 0 from the start.
        sub.send(&Packet::Disconnect(Default::default())).await;
        let _ = sub.until_closed().await;
        sub = open(gw.addr(), id, false, protocol).await.0;
    }
    assert_eq!(sub.suback_code(1, topic).await, 0x01);
    sub.send(&Packet::Disconnect(Default::default())).await;
    let _ = sub.until_closed().await;

    let (mut publisher, _) = open(gw.addr(), &unique("pub"), true, Protocol::V5).await;
    let mut bytes = bytes::BytesMut::new();
    for i in 0..BACKLOG {
        let id = u16::try_from(i + 1).expect("packet id");
        let m = crate::common::publish_packet(id, topic, QoS::AtLeastOnce, format!("{i:03}").as_bytes());
        p::encode(&m, Protocol::V5, &mut bytes).expect("encode");
    }
    publisher.send_bytes(&bytes).await;
    for _ in 0..BACKLOG {
        match publisher.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS),
            other => panic!("the publisher expected PUBACK, got {other:?}"),
        }
    }
    // The backlog is what the core service reports as stored (RocketMQ's queue offsets may
    // trail its acknowledgements by a moment): wait until all of it is.
    let core = topic.split('/').next().unwrap_or(topic);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let partitions = gw.ctx.backend.partitions(core).unwrap_or(0);
        let mut stored = 0;
        for p in 0..partitions {
            let tp = lmq_gateway::backend::TopicPartition::new(core, p);
            stored += gw.ctx.backend.end_offset(&tp).await.unwrap_or(0);
        }
        if stored >= BACKLOG as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "{stored} of {BACKLOG} messages visible in the core service");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn request(pid: u16, qos: QoS, body: &str) -> Packet {
    crate::common::publish_packet(pid, GET, qos, body.as_bytes())
}

/// What came after some requests: their acknowledgements' codes by packet id, and the
/// payloads and packet ids of the messages delivered, in order. Reads until `acks` requests
/// are answered and nothing more came for `quiet`.
struct Seen {
    acks: Vec<(u16, u8)>,
    messages: Vec<(String, u16)>,
}

async fn collect(raw: &mut Raw, acks: usize, quiet: Duration) -> Seen {
    collect_acking(raw, acks, quiet, false).await
}

/// [`collect`], acknowledging each message as it comes when `acking`.
async fn collect_acking(raw: &mut Raw, acks: usize, quiet: Duration, acking: bool) -> Seen {
    let mut seen = Seen { acks: Vec::new(), messages: Vec::new() };
    let deadline = Instant::now() + crate::common::WAIT;
    loop {
        let wait = if seen.acks.len() >= acks { quiet } else { crate::common::WAIT };
        match next_within(raw, wait).await {
            Some(Packet::PubAck(a)) => seen.acks.push((a.packet_id.get(), a.code.0)),
            Some(Packet::Publish(m)) => {
                let pid = m.packet_id.map_or(0, NonZeroU16::get);
                if let (true, Some(id)) = (acking, m.packet_id) {
                    raw.send(&Packet::PubAck(p::PubResponse::new(id))).await;
                }
                seen.messages.push((String::from_utf8_lossy(&m.payload).into_owned(), pid));
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
        assert!(Instant::now() < deadline + quiet, "packets keep coming");
    }
    assert_eq!(seen.acks.len(), acks, "acknowledgements of the requests");
    seen
}

fn payloads(seen: &Seen) -> Vec<String> {
    seen.messages.iter().map(|(m, _)| m.clone()).collect()
}

fn range(r: std::ops::Range<u32>) -> Vec<String> {
    r.map(|i| format!("{i:03}")).collect()
}

async fn ack(raw: &mut Raw, seen: &Seen, which: impl Fn(&str) -> bool) {
    for (m, pid) in &seen.messages {
        if which(m) {
            raw.send(&Packet::PubAck(p::PubResponse::new(NonZeroU16::new(*pid).expect("QoS 1")))).await;
        }
    }
}

/// Back after 100 messages, the subscriber is sent nothing until it asks; a request for 50
/// delivers the oldest 30 in order, a DESC request the newest first; a malformed request gets
/// 0x99 and nothing.
pub async fn offline_pull_delivers_at_most_30_per_request_and_only_on_request(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let (id, topic) = (unique("puller"), format!("{}/data", unique("pull")));
    backlog(&gw, &id, &topic, Protocol::V5).await;

    let (mut sub, present) = open(gw.addr(), &id, false, Protocol::V5).await;
    assert!(present, "the session is restored");
    // Nothing is pushed while the gateway waits for the request.
    let early = next_within(&mut sub, Duration::from_millis(WINDOW_MS / 3)).await;
    assert!(early.is_none(), "pushed before any request: {early:?}");

    sub.send(&request(1, QoS::AtLeastOnce, r#"{"maxPushNum":50,"pushOrder":"ASC"}"#)).await;
    // Quiet for longer than the window: the rest is not pushed when it ends.
    let seen = collect(&mut sub, 1, Duration::from_millis(WINDOW_MS + 500)).await;
    assert_eq!(seen.acks, vec![(1, 0x00)]);
    assert_eq!(payloads(&seen), range(0..30), "the oldest 30, oldest first");

    sub.send(&request(2, QoS::AtLeastOnce, r#"{"maxPushNum":5,"pushOrder":"DESC"}"#)).await;
    let seen = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(seen.acks, vec![(2, 0x00)]);
    assert_eq!(payloads(&seen), ["099", "098", "097", "096", "095"], "the newest first");

    sub.send(&request(3, QoS::AtLeastOnce, "{not json")).await;
    let seen = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(seen.acks, vec![(3, 0x99)], "malformed request");
    assert!(seen.messages.is_empty());

    // QoS 0 requests work too; DESC continues below what was pulled.
    sub.send(&request(0, QoS::AtMostOnce, r#"{"maxPushNum":3,"pushOrder":"DESC"}"#)).await;
    let seen = collect(&mut sub, 0, Duration::from_millis(1000)).await;
    assert_eq!(payloads(&seen), ["094", "093", "092"]);

    // Messages published now are delivered live, without asking.
    let (mut publisher, _) = open(gw.addr(), &unique("pub"), true, Protocol::V5).await;
    sub_live_check(&mut publisher, &mut sub, &topic).await;
}

async fn sub_live_check(publisher: &mut Raw, sub: &mut Raw, topic: &str) {
    publisher.send(&crate::common::publish_packet(1, topic, QoS::AtLeastOnce, b"live")).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
    let seen = collect(sub, 0, Duration::from_millis(1000)).await;
    assert_eq!(payloads(&seen), ["live"], "a message published after the CONNECT");
}

/// Six requests within a second: five are served, the sixth is refused with 0x97 and
/// delivers nothing.
pub async fn offline_pull_serves_at_most_5_requests_per_second(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let (id, topic) = (unique("puller"), format!("{}/data", unique("pull")));
    backlog(&gw, &id, &topic, Protocol::V5).await;

    let (mut sub, _) = open(gw.addr(), &id, false, Protocol::V5).await;
    let mut bytes = bytes::BytesMut::new();
    for pid in 1..=6 {
        p::encode(&request(pid, QoS::AtLeastOnce, r#"{"maxPushNum":2}"#), Protocol::V5, &mut bytes).expect("encode");
    }
    let sent = Instant::now();
    sub.send_bytes(&bytes).await;
    let seen = collect(&mut sub, 6, Duration::from_millis(800)).await;
    assert!(sent.elapsed() < Duration::from_secs(3));
    let mut codes = seen.acks.clone();
    codes.sort_unstable();
    assert_eq!(codes, vec![(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0x97)], "the 6th is over the quota");
    assert_eq!(payloads(&seen), range(0..10), "five requests of two");
    assert_eq!(gw.ctx.limits.refused(lmq_gateway::limits::Refusal::OfflinePullLimit), 1, "the refusal is counted");

    // A second later requests are served again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sub.send(&request(7, QoS::AtLeastOnce, r#"{"maxPushNum":2}"#)).await;
    let seen = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(seen.acks, vec![(7, 0)]);
    assert_eq!(payloads(&seen), range(10..12));
}

/// Only PUBACKs move the session's position: what was pulled and not acknowledged comes
/// again after a reconnect (re-sent in flight), pulling continues past it, and a client
/// that no longer pulls gets the rest pushed, nothing it acknowledged.
pub async fn offline_pull_position_moves_only_with_pubacks(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let (id, topic) = (unique("puller"), format!("{}/data", unique("pull")));
    backlog(&gw, &id, &topic, Protocol::V5).await;

    let (mut sub, _) = open(gw.addr(), &id, false, Protocol::V5).await;
    sub.send(&request(1, QoS::AtLeastOnce, r#"{"maxPushNum":30}"#)).await;
    let first = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(payloads(&first), range(0..30));
    sub.send(&request(2, QoS::AtLeastOnce, r#"{"maxPushNum":10,"pushOrder":"DESC"}"#)).await;
    let newest = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(payloads(&newest), range(90..100).into_iter().rev().collect::<Vec<_>>());
    // Acknowledged: 000-009 and the newest ten (above the unacknowledged ones).
    ack(&mut sub, &first, |m| m < "010").await;
    ack(&mut sub, &newest, |_| true).await;
    // The acknowledgements are in before the DISCONNECT is read.
    sub.send(&Packet::PingReq).await;
    assert!(matches!(next_within(&mut sub, crate::common::WAIT).await, Some(Packet::PingResp)));
    sub.send(&Packet::Disconnect(Default::default())).await;
    let _ = sub.until_closed().await;

    // Back: the 20 pulled and unacknowledged are re-sent at once (in flight, MQTT's rule).
    let (mut sub, present) = open(gw.addr(), &id, false, Protocol::V5).await;
    assert!(present);
    let resent = collect(&mut sub, 0, Duration::from_millis(WINDOW_MS / 3)).await;
    assert_eq!(payloads(&resent), range(10..30), "pulled, not acknowledged: sent again");
    // Pulling goes on after what was pulled before.
    sub.send(&request(1, QoS::AtLeastOnce, r#"{"maxPushNum":30,"pushOrder":"ASC"}"#)).await;
    let next = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(payloads(&next), range(30..60));
    ack(&mut sub, &resent, |_| true).await;
    ack(&mut sub, &next, |_| true).await;
    sub.send(&Packet::PingReq).await;
    assert!(matches!(next_within(&mut sub, crate::common::WAIT).await, Some(Packet::PingResp)));
    sub.send(&Packet::Disconnect(Default::default())).await;
    let _ = sub.until_closed().await;

    // Back without pulling: the rest (060-089) is pushed once the window is over, and
    // nothing acknowledged comes again.
    let (mut sub, _) = open(gw.addr(), &id, false, Protocol::V5).await;
    let connected = Instant::now();
    let pushed = collect(&mut sub, 0, Duration::from_millis(WINDOW_MS + 1500)).await;
    assert_eq!(payloads(&pushed), range(60..90));
    // A request after the window is refused.
    sub.send(&request(9, QoS::AtLeastOnce, "{}")).await;
    let late = collect(&mut sub, 1, Duration::from_millis(300)).await;
    assert_eq!(late.acks, vec![(9, 0x83)], "too late for pull mode");
    assert!(connected.elapsed() > Duration::from_millis(WINDOW_MS));
}

/// A client that does not pull gets its whole backlog pushed, no later than the window after
/// its CONNECT.
pub async fn a_client_that_does_not_pull_gets_its_backlog_pushed(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let (id, topic) = (unique("pusher"), format!("{}/data", unique("push")));
    backlog(&gw, &id, &topic, Protocol::V5).await;

    let (mut sub, present) = open(gw.addr(), &id, false, Protocol::V5).await;
    assert!(present);
    let connected = Instant::now();
    let first = next_within(&mut sub, Duration::from_millis(WINDOW_MS + 2000)).await;
    let waited = connected.elapsed();
    match &first {
        Some(Packet::Publish(m)) if &m.payload[..] == b"000" => {
            sub.send(&Packet::PubAck(p::PubResponse::new(m.packet_id.expect("QoS 1")))).await;
        }
        other => panic!("first: {other:?}"),
    }
    assert!(waited < Duration::from_millis(WINDOW_MS + 1000), "the backlog came {waited:?} after CONNECT");
    let rest = collect_acking(&mut sub, 0, Duration::from_millis(1000), true).await;
    assert_eq!(payloads(&rest), range(1..BACKLOG), "the whole backlog, in order");
}

/// A returning client that publishes something (not a pull request) first gets its backlog
/// at once, without waiting for the window to end.
pub async fn a_client_that_publishes_first_gets_its_backlog_at_once(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}mqtt:\n  offline_pull_window_ms: 6000\n")).await;
    let (id, topic) = (unique("pusher"), format!("{}/data", unique("push")));
    backlog(&gw, &id, &topic, Protocol::V5).await;
    let (mut sub, _) = open(gw.addr(), &id, false, Protocol::V5).await;
    sub.send(&crate::common::publish_packet(1, &format!("{topic}/other"), QoS::AtMostOnce, b"hello")).await;
    // Well before the window ends.
    match next_within(&mut sub, Duration::from_millis(3000)).await {
        Some(Packet::Publish(m)) if &m.payload[..] == b"000" => {
            sub.send(&Packet::PubAck(p::PubResponse::new(m.packet_id.expect("QoS 1")))).await;
        }
        other => panic!("expected the backlog at once, got {other:?}"),
    }
    let seen = collect_acking(&mut sub, 0, Duration::from_millis(700), true).await;
    assert_eq!(payloads(&seen), range(1..BACKLOG));
}

/// MQTT 3.1.1 (cleanSession = 0): requests are acknowledged with a plain PUBACK; a served one
/// delivers, a refused one (beyond 5 per second, malformed) delivers nothing.
pub async fn offline_pull_over_mqtt_311(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{CONFIG}")).await;
    let (id, topic) = (unique("puller311"), format!("{}/data", unique("pull")));
    backlog(&gw, &id, &topic, Protocol::V311).await;

    let (mut sub, present) = open(gw.addr(), &id, false, Protocol::V311).await;
    assert!(present);
    sub.send(&request(1, QoS::AtLeastOnce, r#"{"maxPushNum":100,"pushOrder":"DESC"}"#)).await;
    let seen = collect(&mut sub, 1, Duration::from_millis(500)).await;
    assert_eq!(payloads(&seen), range(70..100).into_iter().rev().collect::<Vec<_>>(), "the newest 30");

    sub.send(&request(2, QoS::AtLeastOnce, "[1,2")).await;
    let seen = collect(&mut sub, 1, Duration::from_millis(300)).await;
    assert_eq!(seen.acks, vec![(2, 0)], "3.1.1 has no reason codes");
    assert!(seen.messages.is_empty(), "malformed: nothing delivered");

    // Six requests within a second: five served (one message each, oldest first), the sixth
    // refused, answered with a plain PUBACK all the same.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut bytes = bytes::BytesMut::new();
    for pid in 3..=8 {
        p::encode(&request(pid, QoS::AtLeastOnce, r#"{"maxPushNum":1}"#), Protocol::V311, &mut bytes).expect("encode");
    }
    sub.send_bytes(&bytes).await;
    let seen = collect(&mut sub, 6, Duration::from_millis(500)).await;
    assert!(seen.acks.iter().all(|(_, code)| *code == 0));
    assert_eq!(payloads(&seen), range(0..5), "five requests served, oldest first");
}
