//! Keyed state in compacted Kafka topics, materialised in memory.
//!
//! One consumer reads every partition of the five state topics from the beginning and keeps
//! the latest value per key (a tombstone deletes it) — the same view on every gateway.
//! Reads are read-your-writes across gateways: `get` and `watch` first ask the brokers for the
//! current end of the store's partitions and wait until the view has consumed up to it, so a
//! session saved by another gateway just before is seen.

use bytes::Bytes;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use crate::backend::{BackendError, Result, StateStore, StateUpdate};
use crate::config::KafkaStateTopics;

pub(super) struct StateView {
    topics: [(StateStore, String); 5],
    inner: parking_lot::Mutex<Inner>,
    /// Bumped after every applied message, so waiters re-check their positions.
    progress: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    values: HashMap<StateStore, HashMap<String, Bytes>>,
    /// Next offset to consume, per (store, partition).
    consumed: HashMap<(StateStore, i32), i64>,
    watchers: HashMap<StateStore, Vec<mpsc::Sender<StateUpdate>>>,
}

impl StateView {
    pub(super) fn new(names: &KafkaStateTopics) -> Arc<StateView> {
        Arc::new(StateView {
            topics: [
                (StateStore::Sessions, names.sessions.clone()),
                (StateStore::Retained, names.retained.clone()),
                (StateStore::Credentials, names.credentials.clone()),
                (StateStore::RevokedTokens, names.revoked_tokens.clone()),
                (StateStore::Delay, names.delay.clone()),
            ],
            inner: parking_lot::Mutex::new(Inner::default()),
            progress: watch::channel(0).0,
        })
    }

    pub(super) fn topic(&self, store: StateStore) -> &str {
        self.topics.iter().find(|(s, _)| *s == store).map(|(_, t)| t.as_str()).unwrap_or_default()
    }

    fn store_of(&self, topic: &str) -> Option<StateStore> {
        self.topics.iter().find(|(_, t)| t == topic).map(|(s, _)| *s)
    }

    /// Assign every partition of the state topics from the beginning.
    pub(super) fn assign(&self, consumer: &StreamConsumer, partitions: &HashMap<String, u32>) -> Result<()> {
        let mut list = TopicPartitionList::new();
        for (_, topic) in &self.topics {
            let n = partitions.get(topic).copied().unwrap_or(1);
            for p in 0..n {
                list.add_partition_offset(topic, p as i32, Offset::Beginning)
                    .map_err(|e| BackendError::Unavailable(e.to_string()))?;
            }
        }
        consumer.assign(&list).map_err(|e| BackendError::Unavailable(e.to_string()))
    }

    /// Apply the state topics' messages until the consumer fails for good (process end).
    pub(super) async fn run(self: Arc<Self>, consumer: StreamConsumer) {
        let mut last_error_log: Option<Instant> = None;
        loop {
            let update = match consumer.recv().await {
                Ok(m) => self.apply(&m),
                Err(e) => {
                    let now = Instant::now();
                    if last_error_log.map_or(true, |t| now.duration_since(t) > Duration::from_secs(10)) {
                        last_error_log = Some(now);
                        tracing::warn!(error = %e, "Kafka state topics: consumer error (retrying)");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if let Some((update, watchers)) = update {
                let mut closed = false;
                for w in &watchers {
                    // Bounded: a slow watcher delays the view, it never misses an update.
                    closed |= w.send(update.clone()).await.is_err();
                }
                if closed {
                    let mut inner = self.inner.lock();
                    if let Some(list) = inner.watchers.get_mut(&update.store) {
                        list.retain(|w| !w.is_closed());
                    }
                }
            }
            self.progress.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Apply one message; the update and who must hear of it.
    fn apply(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Option<(StateUpdate, Vec<mpsc::Sender<StateUpdate>>)> {
        let store = self.store_of(m.topic())?;
        let mut inner = self.inner.lock();
        let next = inner.consumed.entry((store, m.partition())).or_insert(0);
        if m.offset() < *next {
            // A repeat (reads across compaction gaps may return one again).
            return None;
        }
        *next = m.offset() + 1;
        let key = String::from_utf8(m.key()?.to_vec()).ok()?;
        let value = m.payload().map(Bytes::copy_from_slice);
        let values = inner.values.entry(store).or_default();
        match &value {
            Some(v) => {
                values.insert(key.clone(), v.clone());
            }
            None => {
                values.remove(&key);
            }
        }
        let watchers = inner.watchers.get(&store).cloned().unwrap_or_default();
        Some((StateUpdate { store, key, value }, watchers))
    }

    /// Wait until the view has consumed `store` up to the given end offsets.
    pub(super) async fn wait_for(&self, store: StateStore, ends: &[(i32, i64)], limit: Duration) -> Result<()> {
        let mut progress = self.progress.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let behind = {
                let inner = self.inner.lock();
                ends.iter().any(|(p, end)| inner.consumed.get(&(store, *p)).copied().unwrap_or(0) < *end)
            };
            if !behind {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(BackendError::Closed),
                Err(_) => return Err(BackendError::Timeout(limit)),
            }
        }
    }

    pub(super) fn get(&self, store: StateStore, key: &str) -> Option<Bytes> {
        self.inner.lock().values.get(&store).and_then(|m| m.get(key)).cloned()
    }

    /// The current entries, and every later change sent to `updates`.
    pub(super) fn watch(&self, store: StateStore, updates: mpsc::Sender<StateUpdate>) -> Vec<(String, Bytes)> {
        let mut inner = self.inner.lock();
        inner.watchers.entry(store).or_default().push(updates);
        inner.values.get(&store).map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }
}
