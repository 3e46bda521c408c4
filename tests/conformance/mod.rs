//! Backend conformance suite: behaviour every [`CoreService`] must have, written once against
//! the trait so the embedded log, Kafka and RocketMQ engines all run the same checks.
//!
//! Each check takes the service and a topic name unique to the check (so checks can share
//! one service and one cluster), creates what it needs and panics on a violation. A test
//! file per engine wraps every check in a `#[tokio::test]` (see `tests/backend_embedded.rs`).

#![allow(dead_code)]

/// Calls `$m!(check, check, ...)` with every check taking `(core, topic)`, so each engine's
/// test file runs the same list (`events_written` takes other arguments and is run apart).
macro_rules! for_each_check {
    ($m:ident) => {
        $m!(
            append_then_fetch,
            ack_means_visible,
            fetch_from_position,
            per_key_order,
            pipelined_positions_exact,
            tail_delivers_new_records,
            sessions_store,
            retained_store_and_watch,
            auth_stores,
            unknown_topic_refused,
            closed_service_refuses,
        );
    };
}

use bytes::Bytes;
use lmq_gateway::backend::{BackendError, CoreRecord, CoreService, Position, StateStore, StateUpdate, TopicPartition};
use lmq_gateway::events::{ClientEvent, EventType};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::timeout;

/// Longest any single step may take before the check fails instead of hanging.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn record(key: Option<&str>, value: &str) -> CoreRecord {
    CoreRecord {
        key: key.map(|k| Bytes::from(k.to_owned())),
        headers: vec![
            ("topic".into(), Bytes::from_static(b"parent/child")),
            ("qoslevel".into(), Bytes::from_static(b"1")),
        ],
        value: Bytes::from(value.to_owned()),
        timestamp_ms: now_ms(),
    }
}

async fn step<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match timeout(STEP_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {STEP_TIMEOUT:?}"),
    }
}

async fn append(core: &dyn CoreService, topic: &str, rec: CoreRecord) -> Position {
    step("append", core.append(topic, rec)).await.expect("append failed")
}

/// Payload, key, headers and timestamp round-trip; offsets increase.
pub async fn append_then_fetch(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 1)).await.unwrap();
    let mut sent = Vec::new();
    let mut last: Option<u64> = None;
    for i in 0..5 {
        let mut rec = record(Some("k"), &format!("payload-{i}"));
        rec.headers.push(("idx".into(), Bytes::from(vec![i as u8, 0, 255])));
        rec.timestamp_ms = 1_700_000_000_000 + i;
        let pos = append(core, topic, rec.clone()).await;
        assert_eq!(pos.partition, 0);
        if let Some(prev) = last {
            assert!(pos.offset > prev, "offsets must increase");
        }
        last = Some(pos.offset);
        sent.push((pos, rec));
    }
    // A record without key and with empty payload round-trips too.
    let empty = CoreRecord { key: None, headers: vec![], value: Bytes::new(), timestamp_ms: 1 };
    let pos = append(core, topic, empty.clone()).await;
    sent.push((pos, empty));

    let tp = TopicPartition::new(topic, 0);
    let first = sent[0].0.offset;
    let fetched = step("fetch", core.fetch(&tp, first, 100)).await.unwrap();
    assert_eq!(fetched.records.len(), sent.len());
    for (got, (pos, rec)) in fetched.records.iter().zip(&sent) {
        assert_eq!(got.tp, tp);
        assert_eq!(got.offset, pos.offset);
        assert_eq!(&got.record, rec);
    }
    assert_eq!(fetched.next_offset, sent[sent.len() - 1].0.offset + 1);
    assert_eq!(fetched.high_watermark, fetched.next_offset);
}

/// Once `append` resolved, `fetch` and `end_offset` see the record.
pub async fn ack_means_visible(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 2)).await.unwrap();
    for i in 0..20 {
        let rec = record(Some(&format!("key-{i}")), &format!("v{i}"));
        let pos = append(core, topic, rec.clone()).await;
        let tp = TopicPartition::new(topic, pos.partition);
        let end = step("end_offset", core.end_offset(&tp)).await.unwrap();
        assert!(end > pos.offset, "end_offset {end} <= acked {}", pos.offset);
        let fetched = step("fetch", core.fetch(&tp, pos.offset, 1)).await.unwrap();
        assert_eq!(fetched.records.len(), 1, "acked record not readable");
        assert_eq!(fetched.records[0].offset, pos.offset);
        assert_eq!(fetched.records[0].record, rec);
    }
}

/// Reads from a middle offset, past the end, and limited by `max_records`.
pub async fn fetch_from_position(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 1)).await.unwrap();
    let mut offsets = Vec::new();
    for i in 0..10 {
        offsets.push(append(core, topic, record(None, &format!("m{i}"))).await.offset);
    }
    let tp = TopicPartition::new(topic, 0);
    let end = step("end_offset", core.end_offset(&tp)).await.unwrap();
    assert_eq!(end, offsets[9] + 1);

    let mid = step("fetch", core.fetch(&tp, offsets[5], 100)).await.unwrap();
    let got: Vec<u64> = mid.records.iter().map(|r| r.offset).collect();
    assert_eq!(got, offsets[5..].to_vec());
    assert_eq!(mid.records[0].record.value, "m5");
    assert_eq!(mid.next_offset, end);

    let limited = step("fetch", core.fetch(&tp, offsets[0], 3)).await.unwrap();
    let got: Vec<u64> = limited.records.iter().map(|r| r.offset).collect();
    assert_eq!(got, offsets[..3].to_vec());
    assert_eq!(limited.next_offset, offsets[3]);

    let at_end = step("fetch", core.fetch(&tp, end, 10)).await.unwrap();
    assert!(at_end.records.is_empty());
    assert_eq!(at_end.next_offset, end);
    assert_eq!(at_end.high_watermark, end);

    let past = step("fetch", core.fetch(&tp, end + 5, 10)).await.unwrap();
    assert!(past.records.is_empty());
    assert_eq!(past.next_offset, end + 5);

    // Below the start of the log: served from the first retained record.
    let from_zero = step("fetch", core.fetch(&tp, 0, 100)).await.unwrap();
    assert_eq!(from_zero.records.last().map(|r| r.offset), Some(offsets[9]));
}

/// Records queued back to back (each `enqueue` awaited, acknowledgements awaited later, as a
/// connection does under load) get the positions they are read back at, in queue order.
pub async fn pipelined_positions_exact(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 2)).await.unwrap();
    let mut acks = Vec::new();
    let mut sent = Vec::new();
    for i in 0..200 {
        let rec = record(Some(["left", "right"][i % 2]), &format!("p{i}"));
        acks.push(step("enqueue", core.enqueue(topic, rec.clone())).await.expect("enqueue failed"));
        sent.push(rec);
    }
    let mut positions = Vec::new();
    for ack in acks {
        positions.push(step("ack", ack).await.expect("append failed"));
    }
    for (pos, rec) in positions.iter().zip(&sent) {
        let tp = TopicPartition::new(topic, pos.partition);
        let fetched = step("fetch", core.fetch(&tp, pos.offset, 1)).await.unwrap();
        assert_eq!(fetched.records.first().map(|r| (r.offset, &r.record)), Some((pos.offset, rec)), "at {pos:?}");
    }
    // Per key: one partition, increasing offsets.
    for key in 0..2 {
        let mine: Vec<&Position> = positions.iter().skip(key).step_by(2).collect();
        assert!(mine.iter().all(|p| p.partition == mine[0].partition));
        assert!(mine.windows(2).all(|w| w[0].offset < w[1].offset));
    }
}

/// Concurrent appends with 3 keys: each key's records land in one partition, in order.
pub async fn per_key_order(core: &dyn CoreService, topic: &str) {
    const PER_KEY: usize = 100;
    step("ensure_topic", core.ensure_topic(topic, 4)).await.unwrap();
    let keys = ["alpha", "beta", "gamma"];
    // Each key appends sequentially; the keys run concurrently.
    let runs = keys.iter().map(|key| async move {
        let mut positions = Vec::with_capacity(PER_KEY);
        for seq in 0..PER_KEY {
            let rec = record(Some(key), &format!("{key}:{seq}"));
            positions.push(append(core, topic, rec).await);
        }
        positions
    });
    let results = futures::future::join_all(runs).await;
    for (key, positions) in keys.iter().zip(results) {
        let partition = positions[0].partition;
        assert!(positions.iter().all(|p| p.partition == partition), "key {key} spread over partitions");
        assert!(positions.windows(2).all(|w| w[0].offset < w[1].offset));
        let tp = TopicPartition::new(topic, partition);
        let mut next = positions[0].offset;
        let mut seqs = Vec::new();
        loop {
            let fetched = step("fetch", core.fetch(&tp, next, 1000)).await.unwrap();
            if fetched.records.is_empty() {
                break;
            }
            for r in &fetched.records {
                if r.record.key.as_deref() == Some(key.as_bytes()) {
                    let value = std::str::from_utf8(&r.record.value).unwrap();
                    let seq: usize = value.rsplit(':').next().unwrap().parse().unwrap();
                    seqs.push(seq);
                }
            }
            next = fetched.next_offset;
        }
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "key {key} out of order");
    }
}

/// A tail delivers records appended after the assigned offset, nothing before it, and
/// nothing after `unassign`; a cancelled poll loses nothing.
pub async fn tail_delivers_new_records(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 1)).await.unwrap();
    let tp = TopicPartition::new(topic, 0);
    append(core, topic, record(None, "old-1")).await;
    append(core, topic, record(None, "old-2")).await;
    let end = step("end_offset", core.end_offset(&tp)).await.unwrap();

    let mut tail = core.tail();
    tail.assign(tp.clone(), end);
    // Nothing new yet: a poll waits (and is cancelled by the timeout without losing anything).
    assert!(timeout(Duration::from_millis(200), tail.poll()).await.is_err());

    let pos = append(core, topic, record(None, "new-1")).await;
    let got = step("poll", tail.poll()).await.unwrap();
    assert_eq!(got.len(), 1, "records: {got:?}");
    assert_eq!(got[0].offset, pos.offset);
    assert_eq!(got[0].tp, tp);
    assert_eq!(got[0].record.value, "new-1");

    // Several records, delivered in order, possibly over several polls.
    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(append(core, topic, record(None, &format!("n{i}"))).await.offset);
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let got = step("poll", tail.poll()).await.unwrap();
        seen.extend(got.iter().map(|r| r.offset));
    }
    assert_eq!(seen, expected);

    tail.unassign(&tp);
    append(core, topic, record(None, "after-unassign")).await;
    match timeout(Duration::from_millis(300), tail.poll()).await {
        Err(_) => {}
        Ok(Ok(records)) => assert!(records.is_empty(), "delivered after unassign: {records:?}"),
        Ok(Err(e)) => panic!("poll failed: {e}"),
    }

    // Re-assigning from an old offset replays from there.
    tail.assign(tp.clone(), pos.offset);
    let got = step("poll", tail.poll()).await.unwrap();
    assert_eq!(got[0].offset, pos.offset);
}

/// Sessions: put, get, overwrite, delete.
pub async fn sessions_store(core: &dyn CoreService, topic: &str) {
    let key = format!("{topic}-client");
    let get = |k: String| core.get_state(StateStore::Sessions, &k);
    assert_eq!(step("get", get(key.clone())).await.unwrap(), None);
    step("put", core.put_state(StateStore::Sessions, &key, Some(Bytes::from_static(b"v1")))).await.unwrap();
    assert_eq!(step("get", get(key.clone())).await.unwrap(), Some(Bytes::from_static(b"v1")));
    step("put", core.put_state(StateStore::Sessions, &key, Some(Bytes::from_static(b"v2")))).await.unwrap();
    assert_eq!(step("get", get(key.clone())).await.unwrap(), Some(Bytes::from_static(b"v2")));
    // Stores are separate keyspaces.
    assert_eq!(step("get", core.get_state(StateStore::Retained, &key)).await.unwrap(), None);
    step("delete", core.put_state(StateStore::Sessions, &key, None)).await.unwrap();
    assert_eq!(step("get", get(key.clone())).await.unwrap(), None);
    // Deleting a missing key is fine.
    step("delete", core.put_state(StateStore::Sessions, &key, None)).await.unwrap();
}

/// Credentials and revoked tokens (the auth module's stores): each is its own keyspace with
/// put / get / delete, and a watch sees the snapshot then every change.
pub async fn auth_stores(core: &dyn CoreService, topic: &str) {
    for store in [StateStore::Credentials, StateStore::RevokedTokens] {
        let key = format!("{topic}-{store:?}");
        step("put", core.put_state(store, &key, Some(Bytes::from_static(b"{\"v\":1}")))).await.unwrap();
        assert_eq!(step("get", core.get_state(store, &key)).await.unwrap(), Some(Bytes::from_static(b"{\"v\":1}")));
        for other in StateStore::ALL.into_iter().filter(|s| *s != store) {
            assert_eq!(step("get", core.get_state(other, &key)).await.unwrap(), None, "{store:?} leaks into {other:?}");
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let snapshot = step("watch", core.watch_state(store, tx)).await.unwrap();
        assert!(snapshot.iter().any(|(k, _)| *k == key), "{store:?} snapshot lacks {key}");
        let key2 = format!("{key}-2");
        step("put", core.put_state(store, &key2, Some(Bytes::from_static(b"two")))).await.unwrap();
        let update = next_update(&mut rx, topic).await;
        assert_eq!(
            (update.store, update.key.as_str(), update.value),
            (store, key2.as_str(), Some(Bytes::from_static(b"two")))
        );
        step("delete", core.put_state(store, &key, None)).await.unwrap();
        let update = next_update(&mut rx, topic).await;
        assert_eq!((update.key.as_str(), update.value), (key.as_str(), None));
        assert_eq!(step("get", core.get_state(store, &key)).await.unwrap(), None);
        step("delete", core.put_state(store, &key2, None)).await.unwrap();
    }
}

/// Retained: the watch returns a snapshot, then updates (deletes as `None`).
pub async fn retained_store_and_watch(core: &dyn CoreService, topic: &str) {
    let k1 = format!("{topic}/a");
    let k2 = format!("{topic}/b");
    step("put", core.put_state(StateStore::Retained, &k1, Some(Bytes::from_static(b"one")))).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let snapshot = step("watch", core.watch_state(StateStore::Retained, tx)).await.unwrap();
    let mine: HashMap<String, Bytes> = snapshot.into_iter().filter(|(k, _)| k.starts_with(topic)).collect();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine.get(&k1), Some(&Bytes::from_static(b"one")));

    step("put", core.put_state(StateStore::Retained, &k2, Some(Bytes::from_static(b"two")))).await.unwrap();
    let update = next_update(&mut rx, topic).await;
    assert_eq!(update.store, StateStore::Retained);
    assert_eq!(update.key, k2);
    assert_eq!(update.value, Some(Bytes::from_static(b"two")));

    step("delete", core.put_state(StateStore::Retained, &k1, None)).await.unwrap();
    let update = next_update(&mut rx, topic).await;
    assert_eq!((update.key.as_str(), update.value), (k1.as_str(), None));
}

/// Next update of the watch whose key belongs to this check.
async fn next_update(rx: &mut tokio::sync::mpsc::Receiver<StateUpdate>, prefix: &str) -> StateUpdate {
    loop {
        let update = step("watch update", rx.recv()).await.expect("watch channel closed");
        if update.key.starts_with(prefix) {
            return update;
        }
    }
}

/// `emit_event` writes to the events topic: key = clientId, headers `eventType` and
/// `lmqGateway` (the gateway marker), JSON body.
pub async fn events_written(core: &dyn CoreService, events_topic: &str, client_id: &str) {
    let event = ClientEvent {
        event_type: EventType::Connect,
        client_id: client_id.to_owned(),
        channel_id: "chan-1".into(),
        client_ip: "192.0.2.7".into(),
        time: now_ms(),
        gateway_id: "gw-test".into(),
        username: Some("user".into()),
        reason: None,
    };
    step("emit_event", core.emit_event(event)).await.unwrap();
    let partitions = core.partitions(events_topic).expect("events topic exists");
    let mut found = None;
    for p in 0..partitions {
        let tp = TopicPartition::new(events_topic, p);
        let mut next = 0;
        loop {
            let fetched = step("fetch", core.fetch(&tp, next, 1000)).await.unwrap();
            if fetched.records.is_empty() {
                break;
            }
            next = fetched.next_offset;
            if let Some(r) = fetched.records.iter().find(|r| r.record.key.as_deref() == Some(client_id.as_bytes())) {
                found = Some(r.clone());
            }
        }
    }
    let found = found.expect("event record not found");
    assert_eq!(found.record.header("eventType").map(|v| v.as_ref()), Some(&b"connect"[..]));
    // The mark of an event written by a gateway survives the core service (takeover needs it).
    assert_eq!(found.record.header(lmq_gateway::events::GATEWAY_HEADER).map(|v| v.as_ref()), Some(&b"gw-test"[..]));
    let body: serde_json::Value = serde_json::from_slice(&found.record.value).unwrap();
    assert_eq!(body["eventType"], "connect");
    assert_eq!(body["clientId"], client_id);
    assert_eq!(body["channelId"], "chan-1");
    assert_eq!(body["clientIp"], "192.0.2.7");
    assert_eq!(body["gatewayId"], "gw-test");
    assert!(body["time"].is_i64());
}

/// Appends and reads of a topic that does not exist are refused.
pub async fn unknown_topic_refused(core: &dyn CoreService, topic: &str) {
    match step("append", core.append(topic, record(Some("k"), "x"))).await {
        Err(BackendError::UnknownTopic { .. }) => {}
        other => panic!("append to unknown topic: {other:?}"),
    }
    assert!(core.partitions(topic).is_err());
    let tp = TopicPartition::new(topic, 0);
    assert!(step("fetch", core.fetch(&tp, 0, 1)).await.is_err());
}

/// After `shutdown`, writes fail quickly instead of hanging.
pub async fn closed_service_refuses(core: &dyn CoreService, topic: &str) {
    step("ensure_topic", core.ensure_topic(topic, 1)).await.unwrap();
    append(core, topic, record(None, "before")).await;
    let mut tail = core.tail();
    tail.assign(TopicPartition::new(topic, 0), 1_000_000);
    step("shutdown", core.shutdown()).await;
    assert!(!core.is_available());
    assert!(step("append", core.append(topic, record(None, "after"))).await.is_err());
    assert!(step("put_state", core.put_state(StateStore::Sessions, "k", Some(Bytes::from_static(b"v"))))
        .await
        .is_err());
    assert!(step("poll", tail.poll()).await.is_err());
    // A second shutdown is harmless.
    step("shutdown", core.shutdown()).await;
}
