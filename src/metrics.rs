//! Every metric of the gateway, by name, in one place (Prometheus, served at the admin
//! port's `/metrics`).
//!
//! Names follow `lmq_<noun>_<unit>_total`; labels are low-cardinality only (listener,
//! transport, QoS, direction, reason, mode) — never a ClientId or a topic, with two bounded
//! exceptions: the backlog gauges ([`BacklogGauges`]) name parent topics (at most the
//! declared ones plus `limits.max_core_topics`) and the ClientIds of the K sessions with the
//! largest backlog (`backlog.top_sessions`), and drop series that leave those sets. The counters of
//! the publish and delivery paths are resolved to plain handles once, when the gateway
//! starts ([`Metrics::message_in`], [`Metrics::bytes_in`], the fields of
//! [`crate::router::RouterStats`], the refusal counters held by [`crate::limits::Limits`]),
//! so counting a message is one atomic add: no label lookup, no allocation.
//!
//! Values that are cheaper to read than to track (retained messages, core-service
//! availability, consumer lag) are sampled when `/metrics` is scraped (`admin`).
//!
//! Every labelled metric starts with a zero sample for each label value known in advance
//! (QoS × direction, refusal reasons, CONNACK codes, authentication failures, close reasons,
//! the configured listeners × transports), so a dashboard shows its series from the first
//! scrape instead of "no data" until something happens.
//! This module only defines and encodes metrics; it must not decide anything.

use prometheus::core::{AtomicI64, GenericGauge};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::time::Instant;

use crate::events::EventType;
use crate::labels::{Refusal, REFUSALS};
use crate::protocol::{QoS, ReasonCode};
use crate::transport::ConnInfo;

/// Buckets of the core-service append latency, in seconds (0.5 ms … 30 s).
const APPEND_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Buckets of delayed messages' lateness, in seconds (5 ms … 60 s).
const LATENESS_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// `code` labels of `lmq_connect_total` the gateway answers CONNECT with: accepted,
/// unsupported protocol version, ClientId not valid, bad user name or password, not
/// authorised, server unavailable, topic name invalid (will), quota exceeded.
pub const CONNECT_CODES: [ReasonCode; 8] = [
    ReasonCode::SUCCESS,
    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::SERVER_UNAVAILABLE,
    ReasonCode::TOPIC_NAME_INVALID,
    ReasonCode::QUOTA_EXCEEDED,
];

/// `reason` labels of `lmq_connections_closed_total`: before a CONNECT, a refused CONNECT,
/// and each way a connection ends (`connection::End::metric_reason`).
pub const CLOSE_REASONS: [&str; 13] = [
    "no_connect",
    "connect_refused",
    "client_disconnect",
    "connection_lost",
    "keepalive_timeout",
    "not_authorized",
    "core_unavailable",
    "limit",
    "protocol_error",
    "slow_reader",
    "taken_over",
    "shutdown",
    "kicked",
];

/// The gateway's metrics and their registry. One per gateway (tests run several in one
/// process, each with its own).
pub struct Metrics {
    registry: Registry,
    /// Name of every metric family registered (also those with no sample yet).
    names: Vec<String>,
    connections: IntGaugeVec,
    connections_opened: IntCounterVec,
    connections_closed: IntCounterVec,
    connects: IntCounterVec,
    auth_failures: IntCounterVec,
    /// `[direction][qos]`, direction 0 = in (client → gateway), 1 = out.
    messages: [[IntCounter; 3]; 2],
    /// `[in, out]`.
    bytes: [IntCounter; 2],
    refusals: [IntCounter; REFUSALS],
    /// Records the router offered to local sessions.
    pub routed: IntCounter,
    /// QoS 0 deliveries dropped because a subscriber's queue was full.
    pub dropped_qos0: IntCounter,
    /// QoS 1/2 messages no member of a shared-subscription group could take.
    pub dropped_shared: IntCounter,
    /// Times a subscriber fell behind and had to read back from the core service.
    pub lag_events: IntCounter,
    pub trace_dropped: IntCounter,
    /// Persistent-session records written by connections (checkpoints, QoS 2, final saves).
    pub session_saves: IntCounter,
    /// QoS 1/2 messages sent to clients and not yet acknowledged.
    pub inflight: IntGauge,
    /// Messages waiting in connections for the in-flight window or the socket.
    pub queued: IntGauge,
    pub subscriptions: IntGauge,
    pub retained: IntGauge,
    append_latency: Histogram,
    pub append_errors: IntCounter,
    /// Records in the core service not yet routed by this gateway (sampled).
    pub consumer_lag: IntGauge,
    /// 1 while the core service accepts writes (sampled).
    pub core_available: IntGauge,
    events: [IntCounter; 3],
    pub event_errors: IntCounter,
    /// Backlog and delay per parent topic and of the top-K sessions (`session::backlog`).
    pub backlog: BacklogGauges,
    /// Delayed messages (`crate::delay`), cloned into it at start.
    pub delay: DelayMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn qos_index(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All metrics, registered in a new registry, with the process collector (CPU, memory,
    /// open file descriptors as `lmq_process_*`).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let names = std::cell::RefCell::new(Vec::new());
        let register = |r: &Registry, c: Box<dyn prometheus::core::Collector>| {
            names.borrow_mut().extend(c.desc().iter().map(|d| d.fq_name.clone()));
            register(r, c);
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(c.clone()));
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(g.clone()));
            g
        };

        let connections = IntGaugeVec::new(
            Opts::new("lmq_connections", "MQTT connections open now (after the transport handshake)"),
            &["listener", "transport"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        register(&registry, Box::new(connections.clone()));
        let connections_opened = counter_vec(
            "lmq_connections_opened_total",
            "MQTT connections opened (transport handshake done)",
            &["listener", "transport"],
        );
        let connections_closed = counter_vec(
            "lmq_connections_closed_total",
            "MQTT connections closed, by reason",
            &["listener", "transport", "reason"],
        );
        let connects = counter_vec("lmq_connect_total", "CONNECT results, by CONNACK reason code", &["code"]);
        for code in CONNECT_CODES {
            connects.with_label_values(&[&connect_code(code)]);
        }
        let auth_failures =
            counter_vec("lmq_auth_failures_total", "Refused CONNECT authentications", &["mode", "reason"]);
        for (mode, reason) in crate::labels::FAILURE_LABELS {
            auth_failures.with_label_values(&[mode.as_str(), reason]);
        }
        let messages_vec = counter_vec(
            "lmq_messages_total",
            "PUBLISH messages: in = accepted from clients for storing, out = sent to clients",
            &["direction", "qos"],
        );
        let messages = ["in", "out"].map(|d| ["0", "1", "2"].map(|q| messages_vec.with_label_values(&[d, q])));
        let bytes_vec =
            counter_vec("lmq_bytes_total", "Bytes read from and written to MQTT client connections", &["direction"]);
        let bytes = ["in", "out"].map(|d| bytes_vec.with_label_values(&[d]));
        let refusals_vec = counter_vec(
            "lmq_limit_refusals_total",
            "Requests refused by an LMQ limit or the reserved namespace",
            &["reason"],
        );
        let refusals = Refusal::ALL.map(|r| refusals_vec.with_label_values(&[r.as_str()]));
        let events_vec =
            counter_vec("lmq_events_written_total", "Client status events written to the core service", &["type"]);
        let events = [EventType::Connect, EventType::Disconnect, EventType::Tcpclean]
            .map(|t| events_vec.with_label_values(&[t.as_str()]));
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(h.clone()));
            h
        };
        let append_latency = histogram(
            "lmq_core_append_duration_seconds",
            "Time from queueing a message in the core service until it is durable",
            APPEND_BUCKETS,
        );
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(g.clone()));
            g
        };
        let float_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{name}: {e}"));
            register(&registry, Box::new(g.clone()));
            g
        };
        let backlog = BacklogGauges {
            messages: gauge_vec(
                "lmq_backlog_messages",
                "Messages in the core service not yet acknowledged by the sessions subscribed to the parent topic, \
                 summed over sessions (sessions=connected: connected here, sum over gateways; \
                 sessions=offline: stored offline sessions, the same on every gateway, max over gateways)",
                &["parent_topic", "sessions"],
            ),
            delay: float_vec(
                "lmq_backlog_delay_seconds",
                "Age of the oldest message of the parent topic not yet acknowledged by some session (0: none)",
                &["parent_topic", "sessions"],
            ),
            session_messages: gauge_vec(
                "lmq_session_backlog_messages",
                "Messages not yet acknowledged by one of the sessions with the largest backlog (backlog.top_sessions)",
                &["client_id"],
            ),
            session_delay: float_vec(
                "lmq_session_backlog_delay_seconds",
                "Age of the oldest message not yet acknowledged by one of the sessions with the largest backlog",
                &["client_id"],
            ),
            sessions: gauge_vec(
                "lmq_backlog_sessions",
                "Sessions counted in the last backlog pass (connected here, stored offline)",
                &["sessions"],
            ),
            shown: parking_lot::Mutex::new((Vec::new(), Vec::new())),
        };
        for kind in ["connected", "offline"] {
            backlog.sessions.with_label_values(&[kind]);
        }
        let delay = DelayMetrics {
            pending: gauge_vec(
                "lmq_delayed_pending_messages",
                "Delayed messages waiting in each delay level (set by the gateway that moves them; 0 elsewhere)",
                &["level"],
            ),
            lateness: histogram(
                "lmq_delayed_lateness_seconds",
                "Time from a delayed message's due time until it was written to its topic",
                LATENESS_BUCKETS,
            ),
            accepted: counter("lmq_delayed_accepted_total", "Delayed messages accepted and stored in a delay level"),
            refused: counter_vec(
                "lmq_delayed_refused_total",
                "Delayed messages refused, by reason (malformed delay, more than 40 days)",
                &["reason"],
            ),
            forwarded: counter_vec(
                "lmq_delayed_forwarded_total",
                "Delayed-message records written on by this gateway (to=level: a lower level; to=topic: delivered)",
                &["to"],
            ),
            dropped: counter_vec(
                "lmq_delayed_dropped_total",
                "Delay-level records that could not be delivered (no due time or topic, topic refused, record rejected by the core service)",
                &["reason"],
            ),
            holder: gauge("lmq_delay_forwarder", "1 while this gateway moves delayed messages"),
        };
        for reason in crate::labels::Refused::ALL {
            delay.refused.with_label_values(&[reason.as_str()]);
        }
        for to in ["level", "topic"] {
            delay.forwarded.with_label_values(&[to]);
        }
        #[cfg(target_os = "linux")]
        register(
            &registry,
            Box::new(prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, "lmq")),
        );

        Metrics {
            connections,
            connections_opened,
            connections_closed,
            connects,
            auth_failures,
            messages,
            bytes,
            refusals,
            routed: counter("lmq_routed_records_total", "Records the router offered to sessions of this gateway"),
            dropped_qos0: counter(
                "lmq_dropped_qos0_messages_total",
                "QoS 0 deliveries dropped because the subscriber's queue was full",
            ),
            dropped_shared: counter(
                "lmq_dropped_shared_messages_total",
                "QoS 1/2 messages no member of a shared-subscription group could take",
            ),
            lag_events: counter(
                "lmq_subscriber_lag_events_total",
                "Times a subscriber's queue was full and it switched to reading back from the core service",
            ),
            trace_dropped: counter(
                "lmq_trace_events_dropped_total",
                "Message-trace events not written (queue full or the core service refused them)",
            ),
            session_saves: counter(
                "lmq_session_saves_total",
                "Persistent-session records written to the core service by this gateway's connections \
                 (checkpoints every mqtt.session_checkpoint_ms while changed, QoS 2 saves before PUBREC, saves at disconnect)",
            ),
            inflight: gauge("lmq_inflight_messages", "QoS 1/2 messages sent to clients and not yet acknowledged"),
            queued: gauge("lmq_queued_messages", "Messages waiting in connections for the in-flight window"),
            subscriptions: gauge("lmq_subscriptions", "Subscriptions held by clients connected here"),
            retained: gauge("lmq_retained_messages", "Retained messages known to this gateway"),
            append_latency,
            append_errors: counter(
                "lmq_core_append_errors_total",
                "Messages the core service failed to store or did not acknowledge in time",
            ),
            consumer_lag: gauge(
                "lmq_consumer_lag_records",
                "Records in the core service's partitions that this gateway has not routed yet",
            ),
            core_available: gauge("lmq_core_available", "1 while the core service accepts writes"),
            events,
            event_errors: counter("lmq_event_errors_total", "Client status events that could not be written"),
            backlog,
            delay,
            registry,
            names: names.into_inner(),
        }
    }

    /// Names of all metric families, including those without samples yet.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Zero samples of the per-listener metrics for each configured listener (name,
    /// transport), so they show before the first client connects.
    pub fn listeners_known<'a>(&self, listeners: impl IntoIterator<Item = (&'a str, &'static str)>) {
        for (listener, transport) in listeners {
            self.connections.with_label_values(&[listener, transport]);
            self.connections_opened.with_label_values(&[listener, transport]);
            for reason in CLOSE_REASONS {
                self.connections_closed.with_label_values(&[listener, transport, reason]);
            }
        }
    }

    /// A connection finished its transport handshake; the returned guard counts its close.
    pub fn connection_opened(&self, info: &ConnInfo) -> ConnectionMetrics {
        let labels = [&*info.listener, info.transport.as_str()];
        self.connections_opened.with_label_values(&labels).inc();
        let current = self.connections.with_label_values(&labels);
        current.inc();
        ConnectionMetrics {
            current,
            closed: self.connections_closed.clone(),
            listener: info.listener.clone(),
            transport: info.transport.as_str(),
            reason: "no_connect",
        }
    }

    /// CONNECT answered with `code` (0x00 = accepted).
    pub fn connect_result(&self, code: ReasonCode) {
        self.connects.with_label_values(&[&connect_code(code)]).inc();
    }

    /// `mode` and `reason` come from `auth::AuthFailure` (fixed sets of names).
    pub fn auth_failure(&self, mode: &str, reason: &str) {
        self.auth_failures.with_label_values(&[mode, reason]).inc();
    }

    /// Counter of PUBLISH messages accepted from clients at `qos`.
    pub fn message_in(&self, qos: QoS) -> &IntCounter {
        &self.messages[0][qos_index(qos)]
    }

    /// Counter of PUBLISH messages sent to clients at `qos`.
    pub fn message_out(&self, qos: QoS) -> &IntCounter {
        &self.messages[1][qos_index(qos)]
    }

    pub fn bytes_in(&self) -> &IntCounter {
        &self.bytes[0]
    }

    pub fn bytes_out(&self) -> &IntCounter {
        &self.bytes[1]
    }

    /// Counter of refusals for one limit (held by `Limits`).
    pub fn refusal(&self, r: Refusal) -> IntCounter {
        self.refusals[r as usize].clone()
    }

    /// A core-service append queued at `started` finished.
    pub fn append_done(&self, started: Instant, ok: bool) {
        if ok {
            self.append_latency.observe(started.elapsed().as_secs_f64());
        } else {
            self.append_errors.inc();
        }
    }

    pub fn event_written(&self, t: EventType, ok: bool) {
        if !ok {
            self.event_errors.inc();
            return;
        }
        let i = match t {
            EventType::Connect => 0,
            EventType::Disconnect => 1,
            EventType::Tcpclean => 2,
        };
        self.events[i].inc();
    }
}

/// `code` label of `lmq_connect_total`: `0x00`, `0x86`, ...
fn connect_code(code: ReasonCode) -> String {
    format!("0x{:02x}", code.0)
}

fn register(registry: &Registry, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        // Only a programming error (duplicate name) gets here.
        tracing::error!(error = %e, "metric not registered");
    }
}

/// Backlog of one parent topic for one kind of session (`connected` / `offline`).
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogRow {
    pub parent_topic: String,
    pub sessions: &'static str,
    pub messages: u64,
    pub delay_secs: f64,
}

/// Backlog of one of the top-K sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionBacklogRow {
    pub client_id: String,
    pub messages: u64,
    pub delay_secs: f64,
}

/// Delayed-message metrics (`crate::delay`).
#[derive(Clone)]
pub struct DelayMetrics {
    pub pending: IntGaugeVec,
    pub lateness: Histogram,
    pub accepted: IntCounter,
    pub refused: IntCounterVec,
    pub forwarded: IntCounterVec,
    pub dropped: IntCounterVec,
    pub holder: IntGauge,
}

/// The backlog gauges: set whole after each pass of `session::backlog`; series whose parent
/// topic or ClientId is not in the new set are removed, so the series count stays bounded.
pub struct BacklogGauges {
    messages: IntGaugeVec,
    delay: GaugeVec,
    session_messages: IntGaugeVec,
    session_delay: GaugeVec,
    sessions: IntGaugeVec,
    shown: parking_lot::Mutex<Shown>,
}

/// Label values of the backlog series shown now: (parent topic, kind) pairs and ClientIds.
type Shown = (Vec<(String, &'static str)>, Vec<String>);

impl BacklogGauges {
    /// Replace every backlog series; `counted` = sessions counted `[connected, offline]`.
    pub fn set(&self, parents: &[BacklogRow], sessions: &[SessionBacklogRow], counted: [u64; 2]) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut shown = self.shown.lock();
        for r in parents {
            let labels = [r.parent_topic.as_str(), r.sessions];
            self.messages.with_label_values(&labels).set(gauge(r.messages));
            self.delay.with_label_values(&labels).set(r.delay_secs);
        }
        for (parent, kind) in &shown.0 {
            if !parents.iter().any(|r| &r.parent_topic == parent && r.sessions == *kind) {
                let _ = self.messages.remove_label_values(&[parent.as_str(), kind]);
                let _ = self.delay.remove_label_values(&[parent.as_str(), kind]);
            }
        }
        for r in sessions {
            self.session_messages.with_label_values(&[&r.client_id]).set(gauge(r.messages));
            self.session_delay.with_label_values(&[&r.client_id]).set(r.delay_secs);
        }
        for id in &shown.1 {
            if !sessions.iter().any(|r| &r.client_id == id) {
                let _ = self.session_messages.remove_label_values(&[id]);
                let _ = self.session_delay.remove_label_values(&[id]);
            }
        }
        *shown = (
            parents.iter().map(|r| (r.parent_topic.clone(), r.sessions)).collect(),
            sessions.iter().map(|r| r.client_id.clone()).collect(),
        );
        for (kind, n) in ["connected", "offline"].into_iter().zip(counted) {
            self.sessions.with_label_values(&[kind]).set(gauge(n));
        }
    }
}

/// Counts one connection: `lmq_connections` while it lives, `lmq_connections_closed_total`
/// with [`ConnectionMetrics::reason`] when dropped.
pub struct ConnectionMetrics {
    current: GenericGauge<AtomicI64>,
    closed: IntCounterVec,
    listener: std::sync::Arc<str>,
    transport: &'static str,
    /// Why it closed (a fixed name); set by the connection as it learns.
    pub reason: &'static str,
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.current.dec();
        self.closed.with_label_values(&[&*self.listener, self.transport, self.reason]).inc();
    }
}

/// Keeps a connection's share of the in-flight, queued and subscription gauges: each
/// connection adds the change since its last report, and takes its share back at the end.
#[derive(Debug, Default)]
pub struct GaugeShare {
    reported: [i64; 3],
}

impl GaugeShare {
    /// Report the connection's current `inflight`, `queued` and `subscriptions`.
    #[inline]
    pub fn report(&mut self, m: &Metrics, now: [usize; 3]) {
        let gauges = [&m.inflight, &m.queued, &m.subscriptions];
        for i in 0..3 {
            let v = i64::try_from(now[i]).unwrap_or(i64::MAX);
            if v != self.reported[i] {
                gauges[i].add(v - self.reported[i]);
                self.reported[i] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_lmq_and_registered_once() {
        let m = Metrics::new();
        m.message_in(QoS::AtLeastOnce).inc();
        m.connect_result(ReasonCode::SUCCESS);
        m.auth_failure("signature", "bad_signature");
        let text = m.encode();
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(name.starts_with("lmq_"), "{name}");
        }
        assert!(text.contains("lmq_messages_total{direction=\"in\",qos=\"1\"} 1"), "{text}");
        assert!(text.contains("lmq_connect_total{code=\"0x00\"} 1"), "{text}");
        assert!(text.contains("lmq_core_append_duration_seconds_bucket"), "{text}");
        #[cfg(target_os = "linux")]
        assert!(text.contains("lmq_process_open_fds"), "{text}");
    }

    #[test]
    fn labelled_metrics_start_at_zero_for_known_labels() {
        let m = Metrics::new();
        m.listeners_known([("tcp", "tcp"), ("ws", "ws")]);
        let text = m.encode();
        for sample in [
            "lmq_messages_total{direction=\"out\",qos=\"2\"} 0",
            "lmq_bytes_total{direction=\"in\"} 0",
            "lmq_limit_refusals_total{reason=\"reserved_topic\"} 0",
            "lmq_connect_total{code=\"0x00\"} 0",
            "lmq_connect_total{code=\"0x86\"} 0",
            "lmq_auth_failures_total{mode=\"signature\",reason=\"bad_signature\"} 0",
            "lmq_connections{listener=\"ws\",transport=\"ws\"} 0",
            "lmq_connections_opened_total{listener=\"tcp\",transport=\"tcp\"} 0",
            "lmq_connections_closed_total{listener=\"tcp\",reason=\"client_disconnect\",transport=\"tcp\"} 0",
            "lmq_events_written_total{type=\"tcpclean\"} 0",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        for r in Refusal::ALL {
            assert!(text.contains(&format!("lmq_limit_refusals_total{{reason=\"{}\"}} 0", r.as_str())), "{r:?}");
        }
    }

    #[test]
    fn backlog_series_that_leave_the_set_are_removed() {
        let m = Metrics::new();
        let row = |p: &str, n| BacklogRow { parent_topic: p.into(), sessions: "offline", messages: n, delay_secs: 1.5 };
        let top = |id: &str, n| SessionBacklogRow { client_id: id.into(), messages: n, delay_secs: 2.0 };
        m.backlog.set(&[row("a", 3), row("b", 0)], &[top("c1", 3)], [0, 1]);
        let text = m.encode();
        assert!(text.contains("lmq_backlog_messages{parent_topic=\"a\",sessions=\"offline\"} 3"), "{text}");
        assert!(text.contains("lmq_backlog_delay_seconds{parent_topic=\"a\",sessions=\"offline\"} 1.5"), "{text}");
        assert!(text.contains("lmq_session_backlog_messages{client_id=\"c1\"} 3"), "{text}");
        assert!(text.contains("lmq_backlog_sessions{sessions=\"offline\"} 1"), "{text}");
        m.backlog.set(&[row("b", 7)], &[top("c2", 7)], [0, 1]);
        let text = m.encode();
        assert!(!text.contains("parent_topic=\"a\""), "{text}");
        assert!(!text.contains("client_id=\"c1\""), "{text}");
        assert!(text.contains("lmq_session_backlog_delay_seconds{client_id=\"c2\"} 2"), "{text}");
    }

    #[test]
    fn gauge_shares_add_up_and_return() {
        let m = Metrics::new();
        let (mut a, mut b) = (GaugeShare::default(), GaugeShare::default());
        a.report(&m, [3, 1, 2]);
        b.report(&m, [1, 0, 5]);
        assert_eq!((m.inflight.get(), m.queued.get(), m.subscriptions.get()), (4, 1, 7));
        a.report(&m, [0, 0, 0]);
        b.report(&m, [0, 0, 0]);
        assert_eq!((m.inflight.get(), m.queued.get(), m.subscriptions.get()), (0, 0, 0));
    }
}
