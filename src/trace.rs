//! Message trace (SPEC §10): what happened to one message — published, stored (where),
//! delivered to and acknowledged by each subscriber, dropped (why) — as events in an internal
//! core topic (`trace.topic`, reserved), keyed by message ID, read back by
//! `GET /api/v1/messages/{msgId}/trace` on any gateway (`crate::query::trace_of`). Events are
//! written in batches (a JSON array per record, up to 512 events), so tracing costs the core
//! service one append per batch, not one per event.
//!
//! Tracing is off by default. When on, a message is traced when its parent topic is in
//! `trace.parents` (empty: all) and its ID falls in the sample (`trace.sample_rate`, decided
//! from a hash of the ID, so every gateway that handles the message makes the same choice
//! without asking anyone). Events are best effort and never slow the messages down: they go
//! through a bounded queue to one writer task; a full queue drops the event and counts it
//! (`lmq_trace_events_dropped_total`). With tracing off the hot path pays one flag test.

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::backend::{CoreRecord, SharedCoreService};
use crate::config::TraceConfig;

/// Events queued for the writer at most; beyond, events are dropped.
const QUEUE: usize = 16_384;
/// Appends the writer keeps outstanding at most.
const OUTSTANDING: usize = 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Publish,
    Stored,
    Delivered,
    Acked,
    Dropped,
    Delayed,
}

/// One trace event as stored (JSON) and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(rename = "msgId")]
    pub msg_id: String,
    #[serde(rename = "clientId")]
    pub client_id: String,
    #[serde(rename = "gatewayId")]
    pub gateway_id: String,
    pub time_ms: i64,
    pub detail: String,
}

/// Decides what is traced and queues events for the writer. Shared by every connection.
#[derive(Debug)]
pub struct Tracer {
    enabled: bool,
    /// Sampled when the ID's hash is below this (of 2^32).
    threshold: u64,
    parents: HashSet<String>,
    gateway_id: String,
    tx: Option<mpsc::Sender<Event>>,
    dropped: prometheus::IntCounter,
}

impl Tracer {
    /// A tracer and, when tracing is on, the receiving end for [`run_writer`].
    pub fn new(
        config: &TraceConfig,
        gateway_id: &str,
        dropped: prometheus::IntCounter,
    ) -> (Arc<Tracer>, Option<mpsc::Receiver<Event>>) {
        let (tx, rx) = if config.enabled {
            let (tx, rx) = mpsc::channel(QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let rate = config.sample_rate.clamp(0.0, 1.0);
        let tracer = Tracer {
            enabled: config.enabled && rate > 0.0,
            threshold: (rate * f64::from(u32::MAX)) as u64 + u64::from(rate >= 1.0),
            parents: config.parents.iter().cloned().collect(),
            gateway_id: gateway_id.to_owned(),
            tx,
            dropped,
        };
        (Arc::new(tracer), rx)
    }

    /// Whether the message with this MQTT topic and ID is traced.
    pub fn wants(&self, topic: &str, msg_id: Option<&str>) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(id) = msg_id.filter(|id| !id.is_empty()) else { return false };
        let parent = topic.split('/').next().unwrap_or(topic);
        if !self.parents.is_empty() && !self.parents.contains(parent) {
            return false;
        }
        u64::from(fnv1a(id.as_bytes())) < self.threshold
    }

    /// Queue an event (dropped and counted when the queue is full).
    pub fn emit(&self, kind: Kind, msg_id: &str, client_id: &str, detail: String) {
        let Some(tx) = &self.tx else { return };
        let event = Event {
            kind,
            msg_id: msg_id.to_owned(),
            client_id: client_id.to_owned(),
            gateway_id: self.gateway_id.clone(),
            time_ms: crate::now_ms(),
            detail,
        };
        if tx.try_send(event).is_err() {
            self.dropped.inc();
        }
    }

    /// [`Tracer::emit`] when the message with this MQTT topic and ID is traced.
    pub fn on(
        &self,
        kind: Kind,
        (topic, msg_id): (&str, Option<&str>),
        client_id: &str,
        detail: impl FnOnce() -> String,
    ) {
        if let Some(id) = msg_id.filter(|_| self.wants(topic, msg_id)) {
            self.emit(kind, id, client_id, detail());
        }
    }
}

fn fnv1a(b: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for x in b {
        h ^= u32::from(*x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Events packed into one record at most.
const BATCH: usize = 512;
/// Longest an event waits for others to share its record.
const GATHER: std::time::Duration = std::time::Duration::from_millis(100);

/// The record of a batch of events: a JSON array, no key (spread over the partitions), the
/// time it is written (at or after every event in it).
fn to_record(events: &[Event]) -> CoreRecord {
    CoreRecord {
        key: None,
        headers: Vec::new(),
        value: Bytes::from(serde_json::to_vec(events).unwrap_or_default()),
        timestamp_ms: crate::now_ms(),
    }
}

/// The events of a trace record (empty when it is not one).
pub fn events_in(record: &CoreRecord) -> Vec<Event> {
    serde_json::from_slice(&record.value).unwrap_or_default()
}

/// Write queued events to `topic` until `stop`, up to [`BATCH`] events per record. Appends
/// are not awaited one by one: up to [`OUTSTANDING`] are in flight; a failed one counts its
/// events as dropped.
pub async fn run_writer(
    backend: SharedCoreService,
    (topic, partitions, retention_ms): (String, u32, u64),
    mut rx: mpsc::Receiver<Event>,
    dropped: prometheus::IntCounter,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ready = false;
    let mut outstanding = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            // Stopping: what is queued is still written.
            _ = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else { break };
        batch.push(first);
        // Gather for a moment: one append (one fsync on the embedded log) per batch, a few
        // per second under load, instead of one per event.
        let until = tokio::time::Instant::now() + GATHER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(e)) => batch.push(e),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        if !ready {
            match backend.ensure_topic_with_retention(&topic, partitions, retention_ms).await {
                Ok(()) => ready = true,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot create the trace topic; trace events dropped");
                    dropped.inc_by(n);
                    batch.clear();
                    continue;
                }
            }
        }
        let record = to_record(&batch);
        batch.clear();
        match backend.enqueue(&topic, record).await {
            Ok(ack) => outstanding.push(async move { (n, ack.await.is_ok()) }),
            Err(_) => dropped.inc_by(n),
        }
        while outstanding.len() >= OUTSTANDING {
            if let Some((n, false)) = outstanding.next().await {
                dropped.inc_by(n);
            }
        }
        while let Some(Some((n, ok))) = futures::FutureExt::now_or_never(outstanding.next()) {
            if !ok {
                dropped.inc_by(n);
            }
        }
    }
    while let Some((n, ok)) = outstanding.next().await {
        if !ok {
            dropped.inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(enabled: bool, rate: f64, parents: &[&str]) -> TraceConfig {
        TraceConfig {
            enabled,
            sample_rate: rate,
            parents: parents.iter().map(|s| (*s).to_owned()).collect(),
            ..TraceConfig::default()
        }
    }

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("t", "t").unwrap()
    }

    #[test]
    fn off_traces_nothing_and_on_follows_parents_and_sample() {
        let id = crate::msgid::next(1_700_000_000_000);
        let (off, rx) = Tracer::new(&config(false, 1.0, &[]), "gw", counter());
        assert!(rx.is_none());
        assert!(!off.wants("a/b", Some(&id)));
        let (all, _rx) = Tracer::new(&config(true, 1.0, &[]), "gw", counter());
        assert!(all.wants("a/b", Some(&id)));
        assert!(!all.wants("a/b", None));
        let (some, _rx) = Tracer::new(&config(true, 1.0, &["a"]), "gw", counter());
        assert!(some.wants("a/b", Some(&id)));
        assert!(!some.wants("b/a", Some(&id)));
        let (none, _rx) = Tracer::new(&config(true, 0.0, &[]), "gw", counter());
        assert!(!none.wants("a/b", Some(&id)));
        // Half the IDs, roughly, and the same choice for the same ID every time.
        let (half, _rx) = Tracer::new(&config(true, 0.5, &[]), "gw", counter());
        let ids: Vec<String> = (0..2000).map(|i| crate::msgid::next(1_700_000_000_000 + i)).collect();
        let n = ids.iter().filter(|id| half.wants("a", Some(id))).count();
        assert!((800..1200).contains(&n), "{n} of 2000 sampled");
        assert!(ids.iter().all(|id| half.wants("a", Some(id)) == half.wants("a/x", Some(id))));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = counter();
        let (t, _rx) = Tracer::new(&config(true, 1.0, &[]), "gw", dropped.clone());
        for _ in 0..QUEUE + 5 {
            t.emit(Kind::Publish, "ID", "c", String::new());
        }
        assert_eq!(dropped.get(), 5);
    }

    #[test]
    fn events_round_trip_through_records() {
        let e = Event {
            kind: Kind::Delivered,
            msg_id: "ID".into(),
            client_id: "c".into(),
            gateway_id: "gw".into(),
            time_ms: 5,
            detail: "qos=1".into(),
        };
        let r = to_record(&[e.clone(), Event { kind: Kind::Acked, ..e.clone() }]);
        let back = events_in(&r);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], e);
        assert_eq!(back[1].kind, Kind::Acked);
        assert!(String::from_utf8_lossy(&r.value).contains("\"type\":\"delivered\""));
        assert!(events_in(&CoreRecord {
            key: None,
            headers: vec![],
            value: Bytes::from_static(b"junk"),
            timestamp_ms: 0
        })
        .is_empty());
    }
}
