//! Hostile-client checks (SPEC §8) written once and run on every core service, the way
//! `tests/conformance` runs the core-service checks: sessions belong to identities
//! (`sessions.rs`), the reserved namespace (`namespace.rs`), a subscriber that stops reading
//! (`bounds.rs`), QoS 2 across a SIGKILL (`crash.rs`).
//!
//! Each check takes a [`Core`], which starts real gateways on one core service (the embedded
//! log in a temporary directory, or a test broker), and talks to them over MQTT as an attacker
//! with an ordinary key would. Topics and ClientIds come from [`unique`], so checks can share
//! one broker. A check ends by dropping its last gateway rather than shutting it down: the
//! test's runtime ends with the check anyway, and a graceful shutdown takes seconds on RocketMQ.
//! A test file per core service wraps every check in a `#[tokio::test]`:
//! `tests/hostile_sessions.rs`, `tests/hostile_namespace.rs`, `tests/hostile_bounds.rs` and
//! `tests/embedded_crash.rs` for the embedded log, `tests/kafka.rs` and `tests/rocketmq.rs`
//! for the brokers.

#![allow(dead_code, unused_imports, unused_macros)]

/// Wraps each check in a `#[tokio::test]` on the embedded log (the broker test files have
/// their own, on their shared broker).
macro_rules! on_embedded {
    ($module:ident; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crate::$module::$name(&crate::hostile::Core::embedded()).await;
        }
    )*};
}

/// Calls `$m!(check, ...)` with every session check.
macro_rules! for_each_session_check {
    ($m:ident) => {
        $m!(
            hostile;
            another_identity_with_the_victims_client_id_gets_a_fresh_session_and_nothing_of_it,
            restored_subscriptions_are_checked_against_the_rights_of_the_new_connection,
            a_token_upload_that_narrows_the_rights_removes_the_subscriptions_it_no_longer_covers,
        );
    };
}

/// Calls `$m!(check, ...)` with every reserved-namespace check.
macro_rules! for_each_namespace_check {
    ($m:ident) => {
        $m!(
            hostile;
            events_topic_cannot_be_subscribed_and_wildcards_carry_no_events,
            forged_connect_event_is_refused_and_the_victim_stays_connected,
            internal_topic_names_are_refused_for_publish_and_subscribe,
            only_events_marked_by_a_gateway_take_a_client_over,
            restored_subscriptions_to_reserved_topics_are_dropped,
        );
    };
}

/// Calls `$m!(check, ...)` with every check that kills a gateway process.
macro_rules! for_each_crash_check {
    ($m:ident) => {
        $m!(
            hostile;
            qos2_is_stored_once_across_a_duplicate_and_a_sigkill,
            qos2_pipelined_is_stored_once_across_sigkills_mid_stream,
        );
    };
}

/// Calls `$m!(check, ...)` with every per-client-bound check.
macro_rules! for_each_bounds_check {
    ($m:ident) => {
        $m!(hostile; a_subscriber_that_stops_reading_is_disconnected_and_gets_every_message_back);
    };
}

pub mod bounds;
pub mod crash;
pub mod namespace;
pub mod sessions;

pub use bounds::*;
pub use crash::*;
pub use namespace::*;
pub use sessions::*;

use crate::common::Raw;
use bytes::Bytes;
use lmq_gateway::auth::signature::sign;
use lmq_gateway::backend::TopicPartition;
use lmq_gateway::config::Config;
use lmq_gateway::gateway::Gateway;
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub const EVENTS: &str = "GID_LMQ_STATUS";

/// The shipped setup: signature mode, parent `*` (the default), keys allowed everything; `ak`
/// is the devices' key, `ak-2` another account's.
pub const AUTH: &str = "auth:
  allow_plain_client_ids: true
  instance_id: inst
  access_keys:
    - id: ak
      secret: s3cret
      publish: [\"#\"]
      subscribe: [\"#\"]
    - id: ak-2
      secret: other-s3cret
      publish: [\"#\"]
      subscribe: [\"#\"]
";

/// Anonymous clients with any ClientId.
pub const OPEN_AUTH: &str = "auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n";

/// A core service the checks start gateways on.
pub struct Core {
    /// The `core:` section of every gateway's configuration.
    core_yaml: String,
    /// Core-topic names reserved on this core service only (state and system topics).
    internal: &'static [&'static str],
    _dir: Option<tempfile::TempDir>,
}

impl Core {
    /// The embedded log in a fresh temporary directory, shared by the gateways a check starts
    /// one after another.
    pub fn embedded() -> Core {
        let dir = tempfile::tempdir().expect("temp dir");
        let core_yaml = format!("core:\n  embedded:\n    data_dir: {}\n", dir.path().display());
        Core { core_yaml, internal: &[], _dir: Some(dir) }
    }

    /// Kafka, with `core_yaml` as the `core:` section (`KafkaBroker::core_yaml`).
    pub fn kafka(core_yaml: String) -> Core {
        Core {
            core_yaml,
            internal: &["lmq-credentials", "lmq-retained", "lmq-revoked-tokens", "__consumer_offsets"],
            _dir: None,
        }
    }

    /// RocketMQ behind the name server `namesrv`.
    pub fn rocketmq(namesrv: &str) -> Core {
        Core {
            core_yaml: format!("core:\n  kind: rocketmq\n  rocketmq:\n    namesrv_addr: \"{namesrv}\"\n"),
            internal: &["LMQ_GATEWAY_STATE", "TBW102", "RMQ_SYS_TRACE_TOPIC", "SCHEDULE_TOPIC_XXXX"],
            _dir: None,
        }
    }

    /// A gateway on this core service listening on 127.0.0.1:0, with `extra` as the rest of its
    /// configuration (`auth`, `topics`, `mqtt`, `admin`; not `listeners` or `core`).
    pub async fn start(&self, extra: &str) -> Gateway {
        let yaml = format!("listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}{extra}", self.core_yaml);
        Gateway::start(Config::from_yaml(&yaml).expect("test config")).await.expect("gateway starts")
    }

    /// A gateway process (the built binary) on this core service, with `extra` as in
    /// [`Core::start`]; killed when dropped.
    pub fn process(&self, extra: &str) -> crate::common::GatewayProcess {
        crate::common::GatewayProcess::start(&format!("{}{extra}", self.core_yaml))
    }

    /// Options of a gateway process as in [`Core::process`], for more than the defaults (the
    /// admin API for its metrics).
    pub fn process_options(&self, extra: &str) -> crate::common::process::ProcessOptions {
        crate::common::GatewayProcess::options(&format!("{}{extra}", self.core_yaml))
    }

    /// Whether this is the embedded log (checks size their load by it).
    pub fn is_embedded(&self) -> bool {
        self._dir.is_some()
    }

    /// Whether this is RocketMQ.
    pub fn is_rocketmq(&self) -> bool {
        self.core_yaml.contains("kind: rocketmq")
    }

    /// Every core-topic name no device may reach on this core service: the events topic (also
    /// in another case), names under the reserved prefix, and this core service's own.
    pub fn reserved_names(&self) -> Vec<String> {
        let common = [EVENTS, "gid_lmq_status", "lmq-sessions", "lmq-delay", "LMQ-trace"];
        common.iter().chain(self.internal).map(|s| (*s).to_owned()).collect()
    }
}

/// `name` followed by a suffix no other call in this test run, and no earlier run, gives:
/// topic and ClientId names of one check on a broker other checks (and runs) share.
pub fn unique(name: &str) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let run = RUN.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        format!("{:x}", (t as u64 % (1 << 32)) ^ u64::from(std::process::id()))
    });
    format!("{name}{run}x{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// User name of the devices' key `ak` in signature mode.
pub const USER: &str = "Signature|ak|inst";

/// User name and password of `id` under the devices' key.
pub fn login(id: &str) -> Option<(String, String)> {
    Some((USER.to_owned(), sign("s3cret", id)))
}

/// An MQTT 5 CONNECT asking for a session that lasts an hour.
pub fn persistent_connect(id: &str, clean: bool, username: &str, password: &str) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: clean,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: Some(username.into()),
        password: Some(Bytes::copy_from_slice(password.as_bytes())),
        properties: p::ConnectProperties { session_expiry_interval: Some(3600), ..Default::default() },
    }))
}

/// Connect; returns (reason code, session present, client).
pub async fn open(addr: SocketAddr, c: Packet) -> (ReasonCode, bool, Raw) {
    let mut raw = Raw::connect(addr, Protocol::V5).await;
    raw.send(&c).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => (a.code, a.session_present, raw),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// MQTT 5 with the devices' key (signature mode), session expiry one hour.
pub async fn signed(addr: SocketAddr, id: &str, clean: bool) -> (ReasonCode, bool, Raw) {
    open(addr, persistent_connect(id, clean, USER, &sign("s3cret", id))).await
}

/// SUBSCRIBE `filters` at QoS 1; every one must be granted.
pub async fn subscribe(raw: &mut Raw, filters: &[&str]) {
    raw.send(&Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(1).expect("non-zero"),
        filters: filters
            .iter()
            .map(|f| ((*f).to_string(), p::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() }))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => assert!(a.codes.iter().all(|c| c.0 <= 2), "SUBACK {:?}", a.codes),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// QoS 1 PUBLISH, acknowledged with success.
pub async fn publish(raw: &mut Raw, topic: &str, payload: &str, id: u16) {
    raw.send(&crate::common::publish_packet(id, topic, QoS::AtLeastOnce, payload.as_bytes())).await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS, "PUBACK for {topic}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Payloads of the PUBLISHes that reach `raw` within `wait` (acknowledging QoS 1 ones).
pub async fn received(raw: &mut Raw, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while let Some(packet) = raw.recv().await {
            if let Packet::Publish(m) = packet {
                got.push(String::from_utf8_lossy(&m.payload).into_owned());
                if let Some(id) = m.packet_id {
                    raw.send(&Packet::PubAck(p::PubResponse::new(id))).await;
                }
            }
        }
    })
    .await;
    got
}

/// DISCONNECT (normal) and wait for the close.
pub async fn disconnect(mut raw: Raw) {
    raw.send(&Packet::Disconnect(Default::default())).await;
    let _ = raw.until_closed().await;
}

/// Status events of the ClientIds `ids` in the events topic, as (event type, JSON body), read
/// through the gateway's core service.
pub async fn status_events(gw: &Gateway, ids: &[&str]) -> Vec<(String, serde_json::Value)> {
    let backend = gw.ctx.backend.clone();
    let mut all = Vec::new();
    for partition in 0..backend.partitions(EVENTS).expect("events topic") {
        let tp = TopicPartition::new(EVENTS, partition);
        let end = backend.end_offset(&tp).await.expect("end of the events topic");
        let mut from = 0;
        while from < end {
            let fetched = backend.fetch(&tp, from, 10_000).await.expect("events read");
            for r in &fetched.records {
                let t = r.record.header("eventType").map(|v| String::from_utf8_lossy(v).into_owned());
                let body: serde_json::Value = serde_json::from_slice(&r.record.value).unwrap_or_default();
                if ids.iter().any(|id| body["clientId"] == *id) {
                    all.push((t.unwrap_or_default(), body));
                }
            }
            if fetched.next_offset <= from {
                break;
            }
            from = fetched.next_offset;
        }
    }
    all
}

/// Payloads of every record of core topic `topic`, read through the gateway's core service.
pub async fn stored_payloads(gw: &Gateway, topic: &str) -> Vec<String> {
    let backend = gw.ctx.backend.clone();
    // Known to this gateway (and created, if nothing was ever written).
    backend.ensure_topic(topic, 1).await.expect("topic");
    let mut out = Vec::new();
    for partition in 0..backend.partitions(topic).expect("partitions") {
        let tp = TopicPartition::new(topic, partition);
        let end = backend.end_offset(&tp).await.expect("end offset");
        let mut from = 0;
        while from < end {
            let fetched = backend.fetch(&tp, from, 1000).await.expect("fetch");
            out.extend(fetched.records.iter().map(|r| String::from_utf8_lossy(&r.record.value).into_owned()));
            if fetched.next_offset <= from {
                break;
            }
            from = fetched.next_offset;
        }
    }
    out
}
