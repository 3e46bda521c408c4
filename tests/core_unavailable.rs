//! The acknowledgement rule when the core service fails or stalls: nothing is acknowledged
//! that was not stored, the client is told, and the gateway recovers when the service does.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{connect_packet, Raw};
use futures::future::BoxFuture;
use lmq_gateway::backend::embedded::EmbeddedCore;
use lmq_gateway::backend::{
    AppendAck, BackendError, CoreRecord, CoreService, Fetched, Result, StateStore, StateUpdate, Tail, TopicPartition,
};
use lmq_gateway::config::Config;
use lmq_gateway::events::ClientEvent;
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self as p, Packet, Protocol, ReasonCode};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

const OK: u8 = 0;
const FAIL: u8 = 1;
const STALL: u8 = 2;
/// Appends work, but the live tail delivers nothing (the gateway falls behind the log).
const PAUSE_TAIL: u8 = 3;
/// The core service's queue is full: an append does not even get its place in the log.
const QUEUE_FULL: u8 = 4;
/// Creating a core topic does not finish (a slow broker's topic creation).
const SLOW_TOPICS: u8 = 5;

/// A live tail that waits while the mode is [`PAUSE_TAIL`].
struct PausableTail {
    inner: Box<dyn Tail>,
    mode: Arc<AtomicU8>,
}

impl Tail for PausableTail {
    fn assign(&mut self, tp: TopicPartition, from: u64) {
        self.inner.assign(tp, from)
    }
    fn unassign(&mut self, tp: &TopicPartition) {
        self.inner.unassign(tp)
    }
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<lmq_gateway::backend::Record>>>> {
        Box::pin(async move {
            while self.mode.load(Ordering::SeqCst) == PAUSE_TAIL {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.inner.poll().await
        })
    }
}

/// The embedded core service with a switch that makes appends fail or hang.
struct Flaky {
    inner: Arc<EmbeddedCore>,
    mode: Arc<AtomicU8>,
}

impl CoreService for Flaky {
    fn kind(&self) -> &'static str {
        "flaky"
    }
    fn ensure_topic(&self, topic: &str, partitions: u32) -> BoxFuture<'_, Result<()>> {
        if self.mode.load(Ordering::SeqCst) == SLOW_TOPICS {
            return Box::pin(std::future::pending());
        }
        self.inner.ensure_topic(topic, partitions)
    }
    fn partitions(&self, topic: &str) -> Result<u32> {
        self.inner.partitions(topic)
    }
    fn enqueue(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<AppendAck>> {
        match self.mode.load(Ordering::SeqCst) {
            // Queued, then never stored: the acknowledgement fails or never comes.
            FAIL => Box::pin(async { Ok(Box::pin(async { Err(BackendError::unavailable("injected")) }) as AppendAck) }),
            STALL => Box::pin(async { Ok(Box::pin(std::future::pending()) as AppendAck) }),
            QUEUE_FULL => Box::pin(std::future::pending()),
            _ => self.inner.enqueue(topic, record),
        }
    }
    fn fetch(&self, tp: &TopicPartition, from: u64, max: usize) -> BoxFuture<'static, Result<Fetched>> {
        self.inner.fetch(tp, from, max)
    }
    fn end_offset(&self, tp: &TopicPartition) -> BoxFuture<'static, Result<u64>> {
        self.inner.end_offset(tp)
    }
    fn tail(&self) -> Box<dyn Tail> {
        Box::new(PausableTail { inner: self.inner.tail(), mode: self.mode.clone() })
    }
    fn put_state(&self, store: StateStore, key: &str, value: Option<Bytes>) -> BoxFuture<'static, Result<()>> {
        self.inner.put_state(store, key, value)
    }
    fn get_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        self.inner.get_state(store, key)
    }
    fn peek_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        self.inner.peek_state(store, key)
    }
    fn scan_state(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        self.inner.scan_state(store, after, limit)
    }
    fn watch_state(
        &self,
        store: StateStore,
        updates: tokio::sync::mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        self.inner.watch_state(store, updates)
    }
    fn follow_state(
        &self,
        store: StateStore,
        updates: tokio::sync::mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<()>> {
        self.inner.follow_state(store, updates)
    }
    fn emit_event(&self, event: ClientEvent) -> BoxFuture<'static, Result<()>> {
        self.inner.emit_event(event)
    }
    fn is_available(&self) -> bool {
        !matches!(self.mode.load(Ordering::SeqCst), FAIL | STALL)
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.inner.shutdown()
    }
}

async fn start(mode: Arc<AtomicU8>) -> (Gateway, tempfile::TempDir) {
    start_with_timeout(mode, 1).await
}

async fn start_with_timeout(mode: Arc<AtomicU8>, backend_timeout_secs: u64) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\nmqtt:\n  backend_timeout_secs: {backend_timeout_secs}\nauth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\nadmin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token: t\ncore:\n  embedded:\n    data_dir: {}\n",
        dir.path().display(),
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let inner = EmbeddedCore::open(&config.core.embedded, &config.topics.events_topic).await.unwrap();
    let gw = Gateway::start_with_backend(config, Arc::new(Flaky { inner, mode })).await.unwrap();
    (gw, dir)
}

fn publish(id: u16) -> Packet {
    Packet::Publish(p::Publish {
        dup: false,
        qos: p::QoS::AtLeastOnce,
        retain: false,
        topic: "cu/x".into(),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::from_static(b"m"),
        properties: Default::default(),
    })
}

async fn connected(addr: std::net::SocketAddr, id: &str, protocol: Protocol) -> Raw {
    let mut raw = Raw::connect(addr, protocol).await;
    raw.send(&connect_packet(id, protocol, true)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    raw
}

#[tokio::test]
async fn failed_append_is_never_acknowledged() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start(mode.clone()).await;
    let mut v5 = connected(gw.addr(), "cu5", Protocol::V5).await;
    let mut v3 = connected(gw.addr(), "cu3", Protocol::V311).await;
    mode.store(FAIL, Ordering::SeqCst);
    v5.send(&publish(1)).await;
    v3.send(&publish(1)).await;
    let seen5 = v5.until_closed().await;
    assert!(!seen5.iter().any(|p| matches!(p, Packet::PubAck(_))), "{seen5:?}");
    assert!(seen5.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::SERVER_BUSY)));
    let seen3 = v3.until_closed().await;
    assert!(seen3.is_empty(), "3.1.1: closed without PUBACK: {seen3:?}");

    // The service comes back: new publishes are acknowledged again.
    mode.store(OK, Ordering::SeqCst);
    let mut again = connected(gw.addr(), "cu5b", Protocol::V5).await;
    again.send(&publish(2)).await;
    assert!(
        matches!(again.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 2 && a.code == ReasonCode::SUCCESS)
    );
}

#[tokio::test]
async fn stalled_core_service_gets_no_ack_and_a_bounded_wait() {
    let mode = Arc::new(AtomicU8::new(STALL));
    let (gw, _dir) = start(mode.clone()).await;
    let mut v5 = connected(gw.addr(), "stall", Protocol::V5).await;
    let start = std::time::Instant::now();
    v5.send(&publish(1)).await;
    let seen = v5.until_closed().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubAck(_))), "{seen:?}");
    assert!(start.elapsed() >= Duration::from_millis(900), "waited for the configured timeout");
    assert!(start.elapsed() < Duration::from_secs(4));
}

/// A PUBLISH waiting for its place in a full core service is waited for beside the
/// connection's loop: meanwhile the client still gets its PINGRESP and its deliveries, and a
/// takeover of its ClientId closes it at once, long before the wait times out.
#[tokio::test]
async fn a_publish_waiting_for_a_full_core_service_holds_off_nothing_else() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start_with_timeout(mode.clone(), 8).await;
    let mut c = connected(gw.addr(), "waits", Protocol::V5).await;
    let sub = p::Subscribe {
        packet_id: NonZeroU16::new(9).unwrap(),
        filters: vec![("cu/#".into(), p::SubscriptionOptions { qos: p::QoS::AtMostOnce, ..Default::default() })],
        properties: Default::default(),
    };
    c.send(&Packet::Subscribe(sub)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    // Another client's message is stored first, while the service has room.
    let mut other = connected(gw.addr(), "other", Protocol::V5).await;
    mode.store(QUEUE_FULL, Ordering::SeqCst);
    let start = std::time::Instant::now();
    c.send(&publish(1)).await;
    c.send(&Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)), "PINGRESP while the PUBLISH waits");
    assert!(start.elapsed() < Duration::from_secs(2), "answered at once: {:?}", start.elapsed());
    // The service has room again for everyone else; the waiting PUBLISH keeps waiting.
    mode.store(OK, Ordering::SeqCst);
    other.send(&publish(5)).await;
    assert!(matches!(other.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 5));
    match c.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"m"),
        other => panic!("expected the delivery while the PUBLISH waits, got {other:?}"),
    }
    // A takeover closes the waiting connection at once, without acknowledging its PUBLISH.
    let _new = connected(gw.addr(), "waits", Protocol::V5).await;
    let seen = c.until_closed().await;
    assert!(start.elapsed() < Duration::from_secs(6), "closed before the wait timed out: {:?}", start.elapsed());
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubAck(_))), "{seen:?}");
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::SESSION_TAKEN_OVER)),
        "{seen:?}"
    );
}

fn subscribe(id: u16, filter: &str) -> Packet {
    Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(id).unwrap(),
        filters: vec![(filter.into(), p::SubscriptionOptions { qos: p::QoS::AtMostOnce, ..Default::default() })],
        properties: Default::default(),
    })
}

/// A SUBSCRIBE waiting for a new core topic is waited for beside the connection's loop:
/// meanwhile the client still gets the deliveries of its other subscriptions, later packets
/// wait their turn (packets take effect in order), and a takeover closes it at once, long
/// before the wait times out. Once topics can be created again, the same SUBSCRIBE works.
#[tokio::test]
async fn a_subscribe_waiting_for_a_new_core_topic_holds_off_nothing_else() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start_with_timeout(mode.clone(), 8).await;
    let mut c = connected(gw.addr(), "subwaits", Protocol::V5).await;
    c.send(&subscribe(9, "cu/#")).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let mut other = connected(gw.addr(), "other", Protocol::V5).await;
    other.send(&publish(4)).await;
    assert!(matches!(other.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 4));
    assert!(matches!(c.recv().await, Some(Packet::Publish(_))));

    mode.store(SLOW_TOPICS, Ordering::SeqCst);
    let start = std::time::Instant::now();
    c.send(&subscribe(10, "slowparent/#")).await;
    c.send(&Packet::PingReq).await;
    // Another client's message to the existing subscription is delivered while it waits.
    other.send(&publish(5)).await;
    assert!(matches!(other.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 5));
    match c.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(&m.payload[..], b"m"),
        other => panic!("expected the delivery while the SUBSCRIBE waits, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2), "delivered at once: {:?}", start.elapsed());
    // A takeover closes it at once; its SUBSCRIBE and the PINGREQ behind it were never answered.
    let _new = connected(gw.addr(), "subwaits", Protocol::V5).await;
    let seen = c.until_closed().await;
    assert!(start.elapsed() < Duration::from_secs(6), "closed before the wait timed out: {:?}", start.elapsed());
    assert!(!seen.iter().any(|p| matches!(p, Packet::SubAck(_) | Packet::PingResp)), "{seen:?}");
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::SESSION_TAKEN_OVER)),
        "{seen:?}"
    );

    // Topics can be created again: the SUBSCRIBE is granted, then the PINGREQ behind it answered.
    mode.store(OK, Ordering::SeqCst);
    let mut again = connected(gw.addr(), "subagain", Protocol::V5).await;
    again.send(&subscribe(11, "slowparent/#")).await;
    again.send(&Packet::PingReq).await;
    match again.recv().await {
        Some(Packet::SubAck(a)) => assert_eq!(a.codes, vec![ReasonCode::SUCCESS]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert!(matches!(again.recv().await, Some(Packet::PingResp)));
}

/// The appends a connection has outstanding are bounded per packet (1,024), not per socket
/// read: with the core service's queue full, a burst of 1,000 PUBLISHes and a PINGREQ gets its
/// PINGRESP at once, but in a second burst the packets past the bound stay unread — the PINGREQ
/// behind them is not answered while the first 1,024 wait.
#[tokio::test]
async fn outstanding_appends_are_bounded_per_packet_not_per_read() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start_with_timeout(mode.clone(), 30).await;
    // MQTT 3.1.1: no Receive Maximum to keep the client below the bound.
    let mut c = connected(gw.addr(), "bounded", Protocol::V311).await;
    mode.store(QUEUE_FULL, Ordering::SeqCst);
    let burst = |ids: std::ops::RangeInclusive<u16>| {
        let mut b = bytes::BytesMut::new();
        for id in ids {
            p::encode(&publish(id), Protocol::V311, &mut b).unwrap();
        }
        p::encode(&Packet::PingReq, Protocol::V311, &mut b).unwrap();
        b
    };
    c.send_bytes(&burst(1..=1000)).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)), "1,000 outstanding: still read");
    c.send_bytes(&burst(1001..=1100)).await;
    let answered = tokio::time::timeout(Duration::from_millis(1500), c.recv()).await;
    assert!(answered.is_err(), "the PINGREQ past 1,024 outstanding appends stays unread: {answered:?}");
    // Taken over: closed at once, nothing acknowledged.
    let _new = connected(gw.addr(), "bounded", Protocol::V5).await;
    let seen = c.until_closed().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::PubAck(_) | Packet::PingResp)), "{seen:?}");
}

#[tokio::test]
async fn shutdown_disconnects_v5_clients_with_0x8b() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start(mode).await;
    let mut v5 = connected(gw.addr(), "bye", Protocol::V5).await;
    let stopper = tokio::spawn(gw.shutdown());
    let seen = v5.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::SERVER_SHUTTING_DOWN)),
        "{seen:?}"
    );
    tokio::time::timeout(Duration::from_secs(15), stopper).await.unwrap().unwrap();
}

async fn admin_get(gw: &Gateway, path: &str) -> (u16, String) {
    let addr = gw.admin_addr().expect("admin API enabled");
    let r = common::http().get(format!("http://{addr}{path}")).bearer_auth("t").send().await.expect("admin answers");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn readiness_and_append_errors_follow_the_core_service() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start(mode.clone()).await;
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200);
    let mut v5 = connected(gw.addr(), "cu-ready", Protocol::V5).await;
    mode.store(FAIL, Ordering::SeqCst);
    let (status, body) = admin_get(&gw, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"available\":false"), "{body}");
    v5.send(&publish(1)).await;
    v5.until_closed().await;
    // The connection is counted as closed once it has finished (session, events).
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let text = loop {
        let (_, text) = admin_get(&gw, "/metrics").await;
        let closed = common::metric_value(&text, "lmq_connections_closed_total", &[("reason", "core_unavailable")]);
        if closed == 1.0 || tokio::time::Instant::now() >= deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(common::metric_value(&text, "lmq_connections_closed_total", &[("reason", "core_unavailable")]), 1.0);
    assert_eq!(common::metric_value(&text, "lmq_core_append_errors_total", &[]), 1.0, "{text}");
    assert_eq!(common::metric_value(&text, "lmq_core_available", &[]), 0.0);
    mode.store(OK, Ordering::SeqCst);
    assert_eq!(admin_get(&gw, "/readyz").await.0, 200);

    // Draining: not ready from the start of shutdown until the admin API stops.
    let mut held = connected(gw.addr(), "cu-drain", Protocol::V5).await;
    mode.store(STALL, Ordering::SeqCst);
    held.send(&publish(2)).await;
    let addr = gw.admin_addr().expect("admin API enabled");
    let stopper = tokio::spawn(gw.shutdown());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = common::http().get(format!("http://{addr}/readyz")).send().await.expect("admin still answers");
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        if body.contains("\"draining\":true") {
            assert_eq!(status, 503);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reported draining: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.until_closed().await;
    tokio::time::timeout(Duration::from_secs(15), stopper).await.unwrap().unwrap();
}

#[tokio::test]
async fn consumer_lag_shows_records_not_yet_routed() {
    let mode = Arc::new(AtomicU8::new(OK));
    let (gw, _dir) = start(mode.clone()).await;
    let mut publisher = connected(gw.addr(), "cu-lag", Protocol::V5).await;
    // A subscription makes the gateway tail the core topic (a topic only published to is not
    // read back).
    let mut subscriber = common::v5::connect(gw.addr(), "cu-lag-sub").await;
    subscriber.subscribe("cu/#", common::v5::QoS::AtMostOnce).await;
    publisher.send(&publish(1)).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    let lag = |text: &str| common::metric_value(text, "lmq_consumer_lag_records", &[]);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while lag(&admin_get(&gw, "/metrics").await.1) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "lag never reached 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stored but not read back. A read already waiting when the tail pauses still delivers
    // one batch; after that every stored record is lag.
    mode.store(PAUSE_TAIL, Ordering::SeqCst);
    for id in 2..5 {
        publisher.send(&publish(id)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = lag(&admin_get(&gw, "/metrics").await.1);
    assert!(before >= 2.0, "{before}");
    for id in 5..10 {
        publisher.send(&publish(id)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(lag(&admin_get(&gw, "/metrics").await.1), before + 5.0);
    // The tail resumes and catches up.
    mode.store(OK, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while lag(&admin_get(&gw, "/metrics").await.1) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "lag did not return to 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
