//! Delayed-message checks (SPEC §9), written once and run on every core service:
//! `tests/delayed.rs` (embedded), `tests/kafka.rs` and `tests/rocketmq.rs` (module
//! `delay_checks`), with the runner macros of `tests/hostile` and its [`Core`].
//!
//! One concern per file: the timing of one message (`basic.rs`) and of 10,000 pending at once
//! (`load.rs`), overdue messages in due order (`order.rs`), 40 days through the injected clock
//! (`clock.rs`), refusals (`refusals.rs`),
//! `__STARTDELIVERTIME` (`start_time.rs`), retain (`retain.rs`), the admin API's send
//! (`admin.rs`), a SIGKILL of the forwarding gateway (`crash.rs`) and two gateways on one
//! cluster (`cluster.rs`).
//!
//! Each check's gateways have a reserved prefix of their own ([`isolated`]), so on a shared
//! broker its delay levels, lease and checkpoints are its alone (a moved delay clock reaches no
//! other check's messages). The checks that measure lateness also take turns ([`serial`]), so
//! that on two cores one does not slow the other's gateway down; they run with a short lease
//! ([`DELAY`]) so that a gateway process takes over from a killed one within a few seconds.

#![allow(dead_code, unused_imports, unused_macros)]

/// Calls `$m!(delay; check, ...)` with every delayed-message check that runs in-process
/// gateways.
macro_rules! for_each_delay_check {
    ($m:ident) => {
        $m!(
            delay;
            a_delayed_message_arrives_no_earlier_than_due_and_about_on_time,
            overdue_messages_are_delivered_in_due_order,
            ten_thousand_pending_delayed_messages_arrive_once_and_on_time,
            forty_days_through_the_moved_clock_and_one_second_more_is_refused,
            out_of_range_or_forbidden_delayed_publishes_are_refused_and_never_delivered,
            start_deliver_time_is_honoured_and_removed_and_a_past_time_is_now,
            a_retained_delayed_message_is_retained_only_once_due,
            admin_send_with_delay_secs_or_deliver_at_ms_is_delayed_and_bad_values_are_400,
        );
    };
}

/// Calls `$m!(delay; check, ...)` with every check that kills a gateway process.
macro_rules! for_each_delay_crash_check {
    ($m:ident) => {
        $m!(delay; a_sigkill_of_the_forwarding_gateway_loses_and_duplicates_no_delayed_message);
    };
}

/// Calls `$m!(delay; check, ...)` with every check of two gateways on one cluster (Kafka,
/// RocketMQ).
macro_rules! for_each_cluster_delay_check {
    ($m:ident) => {
        $m!(delay; two_gateways_one_forwarder_and_delayed_messages_from_either_arrive_once);
    };
}

pub mod admin;
pub mod basic;
pub mod clock;
pub mod cluster;
pub mod crash;
pub mod load;
pub mod order;
pub mod refusals;
pub mod retain;
pub mod start_time;

pub use crate::hostile::Core;
pub use admin::*;
pub use basic::*;
pub use clock::*;
pub use cluster::*;
pub use crash::*;
pub use load::*;
pub use order::*;
pub use refusals::*;
pub use retain::*;
pub use start_time::*;

use bytes::{Bytes, BytesMut};
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self as p, Packet, Protocol, PubResponse, QoS, ReasonCode};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `extra` (a gateway's configuration after `core:`) with a reserved prefix of its own, so the
/// check's delay levels, lease and checkpoints on a shared broker are its alone (otherwise the
/// gateways of checks running at once would take turns holding one forwarding lease).
pub fn isolated(extra: &str) -> String {
    isolated_as(extra).0
}

/// [`isolated`], and the reserved prefix it chose.
pub fn isolated_as(extra: &str) -> (String, String) {
    let prefix = format!("{}-", crate::hostile::unique("d").to_lowercase());
    (format!("{extra}topics:\n  reserved_prefix: {prefix}\n"), prefix)
}

/// The `delay:` section of the gateways the checks start: a short lease, so that a gateway
/// takes over from a killed one within a few seconds.
pub const DELAY: &str = "delay:\n  lease_ms: 2000\n  timeout_secs: 2\n";

/// The admin token of the gateways the checks start with [`ADMIN`].
pub const TOKEN: &str = "delay-admin-token";

/// The `admin:` section for checks that use the admin API.
pub const ADMIN: &str = "admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token: delay-admin-token\n";

/// One check at a time in a test binary (see the module docs). Hold the guard for the whole
/// check.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Wait until `gw` moves delayed messages (it holds the forwarding lease).
pub async fn wait_forwarding(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.ctx.metrics.delay.holder.get() != 1 {
        assert!(Instant::now() < deadline, "the gateway never took up forwarding delayed messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the forwarders of `gw` have read `n` pending delayed messages (the sum of
/// `lmq_delayed_pending_messages`).
pub async fn wait_pending(gw: &Gateway, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending: i64 = gw
            .ctx
            .delay
            .levels
            .all()
            .map(|k| gw.ctx.metrics.delay.pending.with_label_values(&[&k.to_string()]).get())
            .sum();
        if pending == n {
            return;
        }
        assert!(Instant::now() < deadline, "the forwarders read {pending} pending delayed messages, not {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wall-clock time in epoch milliseconds (the clock the gateway's delays are measured by).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `lmq_delayed_refused_total{reason}` of `gw`.
pub fn refused(gw: &Gateway, reason: &str) -> u64 {
    gw.ctx.metrics.delay.refused.with_label_values(&[reason]).get()
}

/// One PUBLISH a [`Collector`] received.
#[derive(Debug, Clone)]
pub struct Got {
    pub topic: String,
    pub payload: String,
    /// When it was read from the socket (epoch ms).
    pub at_ms: i64,
    pub dup: bool,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
}

/// An MQTT 5 CONNECT; `expiry` > 0 asks for a persistent session.
pub fn connect_v5(id: &str, clean: bool, expiry: u32) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: p::ConnectProperties {
            session_expiry_interval: (expiry > 0).then_some(expiry),
            ..Default::default()
        },
    }))
}

/// A QoS 1 PUBLISH with user properties.
pub fn publish_v5(pid: u16, topic: &str, payload: &str, retain: bool, props: &[(&str, String)]) -> Packet {
    Packet::Publish(p::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: topic.into(),
        packet_id: NonZeroU16::new(pid),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: p::PublishProperties {
            user_properties: props.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
            ..Default::default()
        },
    })
}

/// A subscriber (MQTT 5, QoS 1, acknowledging every message at once) reading in its own task
/// and keeping every PUBLISH with the time it arrived, until it is dropped or the connection
/// ends.
pub struct Collector {
    got: Arc<Mutex<Vec<Got>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Connect as `id` (`expiry` > 0: a persistent session, resumed when `clean` is false),
    /// subscribe to `filters` at QoS 1 and return once the SUBACK granted them all.
    pub async fn start(addr: SocketAddr, id: &str, clean: bool, expiry: u32, filters: &[&str]) -> Collector {
        Collector::start_with(addr, connect_v5(id, clean, expiry), filters).await
    }

    /// As [`Collector::start`], connecting with `connect` (an MQTT 5 CONNECT).
    pub async fn start_with(addr: SocketAddr, connect: Packet, filters: &[&str]) -> Collector {
        let id = match &connect {
            Packet::Connect(c) => c.client_id.to_string(),
            _ => String::new(),
        };
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut out = BytesMut::new();
        p::encode(&connect, Protocol::V5, &mut out).expect("encode");
        if !filters.is_empty() {
            let sub = Packet::Subscribe(p::Subscribe {
                packet_id: NonZeroU16::new(1).expect("non-zero"),
                filters: filters
                    .iter()
                    .map(|f| ((*f).to_owned(), p::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() }))
                    .collect(),
                properties: Default::default(),
            });
            p::encode(&sub, Protocol::V5, &mut out).expect("encode");
        }
        s.write_all(&out).await.expect("write");
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(read_loop(s, got.clone(), !filters.is_empty(), ready_tx));
        let ready = tokio::time::timeout(Duration::from_secs(10), ready_rx).await;
        assert!(matches!(ready, Ok(Ok(true))), "{id}: no CONNACK and SUBACK granting {filters:?}");
        Collector { got, task }
    }

    /// Everything received so far.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().expect("collector").clone()
    }

    pub fn count(&self) -> usize {
        self.got.lock().expect("collector").len()
    }

    /// Wait until `n` messages arrived or `within` passed; everything received.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Got> {
        let deadline = Instant::now() + within;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.got()
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        !self.task.is_finished()
    }

    /// Drop the connection without DISCONNECT.
    pub fn close(self) {
        self.task.abort();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_loop(
    mut s: tokio::net::TcpStream,
    got: Arc<Mutex<Vec<Got>>>,
    subscribing: bool,
    ready: tokio::sync::oneshot::Sender<bool>,
) {
    let mut ready = Some(ready);
    let mut connected = false;
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        loop {
            match p::decode(&mut buf, Protocol::V5, 1 << 20) {
                Ok(Some(Packet::ConnAck(a))) => {
                    connected = a.code == ReasonCode::SUCCESS;
                    if !connected || !subscribing {
                        if let Some(r) = ready.take() {
                            let _ = r.send(connected);
                        }
                    }
                }
                Ok(Some(Packet::SubAck(a))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(connected && a.codes.iter().all(|c| c.0 <= 2));
                    }
                }
                Ok(Some(Packet::Publish(m))) => {
                    got.lock().expect("collector").push(Got {
                        topic: m.topic.clone(),
                        payload: String::from_utf8_lossy(&m.payload).into_owned(),
                        at_ms: now_ms(),
                        dup: m.dup,
                        retain: m.retain,
                        user_properties: m.properties.user_properties.clone(),
                    });
                    if let Some(id) = m.packet_id {
                        let _ = p::encode(&Packet::PubAck(PubResponse::new(id)), Protocol::V5, &mut out);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match s.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// A message to publish with [`publish_all`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: String,
    pub user_properties: Vec<(&'static str, String)>,
    /// Due this many ms after it is sent, as `__STARTDELIVERTIME` (set when it is written).
    pub start_after_ms: Option<i64>,
}

/// What became of one [`Outgoing`].
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Just before its PUBLISH was written (epoch ms).
    pub sent_ms: i64,
    /// When its PUBACK was read (epoch ms; 0: none).
    pub acked_ms: i64,
    /// The PUBACK's reason code.
    pub code: u8,
    /// The `__STARTDELIVERTIME` it was sent with.
    pub due_ms: Option<i64>,
}

/// Publish `msgs` at QoS 1 over one MQTT 5 connection with `window` PUBLISHes in flight;
/// returns what became of each once every one is acknowledged or the connection ended
/// (`acked_ms` 0 for those without PUBACK).
pub async fn publish_all(addr: SocketAddr, id: &str, msgs: &[Outgoing], window: usize) -> Vec<Sent> {
    let mut sent = vec![Sent { sent_ms: 0, acked_ms: 0, code: 0, due_ms: None }; msgs.len()];
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return sent };
    let mut out = BytesMut::new();
    p::encode(&connect_v5(id, true, 0), Protocol::V5, &mut out).expect("encode");
    if s.write_all(&out).await.is_err() {
        return sent;
    }
    let mut buf = BytesMut::new();
    let mut inflight: std::collections::HashMap<u16, usize> = Default::default();
    let mut pid: u16 = 0;
    let mut next = 0;
    let mut connected = false;
    loop {
        if connected && next < msgs.len() && inflight.len() < window {
            out.clear();
            let mut sending = Vec::new();
            let at = now_ms();
            while next < msgs.len() && inflight.len() < window {
                pid = pid % 60_000 + 1;
                let m = &msgs[next];
                let mut props: Vec<(&str, String)> = m.user_properties.iter().map(|(k, v)| (*k, v.clone())).collect();
                if let Some(after) = m.start_after_ms {
                    sent[next].due_ms = Some(at + after);
                    props.push(("__STARTDELIVERTIME", (at + after).to_string()));
                }
                p::encode(&publish_v5(pid, &m.topic, &m.payload, false, &props), Protocol::V5, &mut out)
                    .expect("encode");
                inflight.insert(pid, next);
                sending.push(next);
                next += 1;
            }
            for i in sending {
                sent[i].sent_ms = at;
            }
            if s.write_all(&out).await.is_err() {
                return sent;
            }
        }
        if connected && next >= msgs.len() && inflight.is_empty() {
            return sent;
        }
        match tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return sent,
        }
        let at = now_ms();
        while let Ok(Some(packet)) = p::decode(&mut buf, Protocol::V5, 1 << 20) {
            match packet {
                Packet::ConnAck(_) => connected = true,
                Packet::PubAck(a) => {
                    if let Some(i) = inflight.remove(&a.packet_id.get()) {
                        sent[i] = Sent { acked_ms: at, code: a.code.0, ..sent[i] };
                    }
                }
                _ => {}
            }
        }
    }
}

/// Publish one QoS 1 message as MQTT 5 (with `props` as user properties, `retain` as given);
/// the PUBACK's reason code and the time it arrived (epoch ms).
pub async fn publish_one(
    addr: SocketAddr,
    topic: &str,
    payload: &str,
    retain: bool,
    props: &[(&str, String)],
) -> (u8, i64) {
    let mut raw = crate::common::Raw::connect(addr, Protocol::V5).await;
    raw.send(&connect_v5(&crate::hostile::unique("delay-pub"), true, 0)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS));
    raw.send(&publish_v5(1, topic, payload, retain, props)).await;
    let code = match raw.recv().await {
        Some(Packet::PubAck(a)) => a.code.0,
        other => panic!("PUBLISH {topic}: expected PUBACK, got {other:?}"),
    };
    let at = now_ms();
    raw.send(&Packet::Disconnect(Default::default())).await;
    (code, at)
}

/// `METHOD path` on `gw`'s admin API with [`TOKEN`]; status and JSON body (Null if none).
pub async fn api(gw: &Gateway, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    let addr = gw.admin_addr().expect("admin API enabled");
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = crate::common::http().request(method, format!("http://{addr}{path}")).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("admin request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// The `q`-quantile of `v` (sorted in place).
pub fn quantile(v: &mut [i64], q: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}
