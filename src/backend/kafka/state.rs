//! Keyed state in compacted Kafka topics, materialised locally.
//!
//! One consumer reads every partition of the five state topics and keeps the latest value per
//! key (a tombstone deletes it) — the same view on every gateway. The sessions store, the one
//! that grows with the fleet, is kept on disk ([`DiskState`]) and read from where that file
//! left off; the others (retained messages, credentials, revoked tokens, delay checkpoints)
//! are read from the beginning into memory.
//! Reads are read-your-writes across gateways: `get` and `watch` first ask the brokers for the
//! current end of the store's partitions and wait until the view has consumed up to it, so a
//! session saved by another gateway just before is seen.

use bytes::Bytes;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use crate::backend::diskstate::{Change, DiskState};
use crate::backend::{BackendError, Result, StateStore, StateUpdate};
use crate::config::KafkaStateTopics;

/// Messages taken from the consumer at once (one disk transaction for the sessions among them).
const MAX_BATCH: usize = 2048;

pub(super) struct StateView {
    topics: [(StateStore, String); 5],
    inner: parking_lot::Mutex<Inner>,
    /// The sessions store (values and the offsets read), on disk.
    sessions: Arc<DiskState>,
    /// Bumped after every applied batch, so waiters re-check their positions.
    progress: watch::Sender<u64>,
}

/// A sessions-topic message, owned, on its way to the disk (`key` `None`: not UTF-8, only
/// its offset counts).
#[derive(Clone)]
struct SessionChange {
    partition: u32,
    offset: u64,
    key: Option<String>,
    value: Option<Bytes>,
}

#[derive(Default)]
struct Inner {
    values: HashMap<StateStore, HashMap<String, Bytes>>,
    /// Next offset to consume, per (store, partition).
    consumed: HashMap<(StateStore, i32), i64>,
    watchers: HashMap<StateStore, Vec<mpsc::Sender<StateUpdate>>>,
}

impl StateView {
    pub(super) fn new(names: &KafkaStateTopics, sessions: DiskState) -> Arc<StateView> {
        let read: HashMap<(StateStore, i32), i64> = sessions
            .offsets()
            .unwrap_or_default()
            .into_iter()
            .map(|(p, o)| ((StateStore::Sessions, p as i32), i64::try_from(o).unwrap_or(i64::MAX)))
            .collect();
        Arc::new(StateView {
            sessions: Arc::new(sessions),
            topics: [
                (StateStore::Sessions, names.sessions.clone()),
                (StateStore::Retained, names.retained.clone()),
                (StateStore::Credentials, names.credentials.clone()),
                (StateStore::RevokedTokens, names.revoked_tokens.clone()),
                (StateStore::Delay, names.delay.clone()),
            ],
            inner: parking_lot::Mutex::new(Inner { consumed: read, ..Inner::default() }),
            progress: watch::channel(0).0,
        })
    }

    pub(super) fn topic(&self, store: StateStore) -> &str {
        self.topics.iter().find(|(s, _)| *s == store).map(|(_, t)| t.as_str()).unwrap_or_default()
    }

    fn store_of(&self, topic: &str) -> Option<StateStore> {
        self.topics.iter().find(|(_, t)| t == topic).map(|(s, _)| *s)
    }

    /// Where the sessions store's file left off, per partition (`ends`: the topic's end
    /// offsets now). Offsets beyond the end mean the topic was created again since: the file
    /// is emptied and the topic read from the beginning.
    pub(super) fn check_sessions(&self, ends: &[(i32, i64)]) -> Result<()> {
        let beyond = {
            let inner = self.inner.lock();
            ends.iter().any(|(p, end)| inner.consumed.get(&(StateStore::Sessions, *p)).is_some_and(|o| o > end))
        };
        if beyond {
            tracing::warn!("sessions cache is ahead of the sessions topic (topic created again?): reading it again");
            self.sessions.clear()?;
            self.inner.lock().consumed.retain(|(store, _), _| *store != StateStore::Sessions);
        }
        Ok(())
    }

    /// Assign every partition of the state topics: the sessions topic from where its file left
    /// off, the others from the beginning.
    pub(super) fn assign(&self, consumer: &StreamConsumer, partitions: &HashMap<String, u32>) -> Result<()> {
        let mut list = TopicPartitionList::new();
        let inner = self.inner.lock();
        for (store, topic) in &self.topics {
            let n = partitions.get(topic).copied().unwrap_or(1);
            for p in 0..n {
                let from = match inner.consumed.get(&(*store, p as i32)) {
                    Some(o) if *store == StateStore::Sessions => Offset::Offset(*o),
                    _ => Offset::Beginning,
                };
                list.add_partition_offset(topic, p as i32, from)
                    .map_err(|e| BackendError::Unavailable(e.to_string()))?;
            }
        }
        consumer.assign(&list).map_err(|e| BackendError::Unavailable(e.to_string()))
    }

    /// Apply the state topics' messages until the consumer fails for good (process end).
    pub(super) async fn run(self: Arc<Self>, consumer: StreamConsumer) {
        let mut last_error_log: Option<Instant> = None;
        loop {
            let mut batch = match consumer.recv().await {
                Ok(m) => vec![m],
                Err(e) => {
                    let now = Instant::now();
                    if last_error_log.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
                        last_error_log = Some(now);
                        tracing::warn!(error = %e, "Kafka state topics: consumer error (retrying)");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Whatever else is already fetched goes in the same batch.
            while batch.len() < MAX_BATCH {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => batch.push(m),
                    _ => break,
                }
            }
            let mut updates = Vec::new();
            let mut sessions = Vec::new();
            for m in &batch {
                match self.store_of(m.topic()) {
                    Some(StateStore::Sessions) => sessions.extend(session_change(m)),
                    Some(store) => updates.extend(self.apply(store, m)),
                    None => {}
                }
            }
            drop(batch);
            if !sessions.is_empty() {
                self.store_sessions(&sessions).await;
                let watchers = self.inner.lock().watchers.get(&StateStore::Sessions).cloned().unwrap_or_default();
                updates.extend(sessions.into_iter().filter_map(|c| {
                    Some((StateUpdate { store: StateStore::Sessions, key: c.key?, value: c.value }, watchers.clone()))
                }));
            }
            for (update, watchers) in updates {
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

    /// Write sessions-topic messages to the file (retried until the disk takes them: the
    /// consumer has moved past them), then count them as consumed.
    async fn store_sessions(&self, changes: &[SessionChange]) {
        let owned: Arc<Vec<SessionChange>> = Arc::new(changes.to_vec());
        loop {
            let (disk, batch) = (self.sessions.clone(), owned.clone());
            let written = tokio::task::spawn_blocking(move || {
                let changes: Vec<Change<'_>> = batch
                    .iter()
                    .filter_map(|c| {
                        let key = c.key.as_deref()?;
                        Some(Change { partition: c.partition, offset: c.offset, key, value: c.value.as_deref() })
                    })
                    .collect();
                disk.apply(&changes)
            })
            .await
            .unwrap_or_else(|e| Err(BackendError::Storage(e.to_string())));
            match written {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "sessions cache: cannot write (retrying in 1 s)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut inner = self.inner.lock();
        for c in changes {
            let next = inner.consumed.entry((StateStore::Sessions, c.partition as i32)).or_insert(0);
            *next = (*next).max(i64::try_from(c.offset).unwrap_or(i64::MAX).saturating_add(1));
        }
    }

    /// Make the sessions file durable (at shutdown).
    pub(super) fn flush(&self) {
        if let Err(e) = self.sessions.flush() {
            tracing::warn!(error = %e, "sessions cache: final flush failed (the next start reads more)");
        }
    }

    /// Apply one message of an in-memory store; the update and who must hear of it.
    fn apply(
        &self,
        store: StateStore,
        m: &BorrowedMessage<'_>,
    ) -> Option<(StateUpdate, Vec<mpsc::Sender<StateUpdate>>)> {
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

    pub(super) async fn get(&self, store: StateStore, key: &str) -> Result<Option<Bytes>> {
        if store == StateStore::Sessions {
            let (disk, key) = (self.sessions.clone(), key.to_owned());
            return tokio::task::spawn_blocking(move || disk.get(&key))
                .await
                .unwrap_or_else(|e| Err(BackendError::Storage(e.to_string())));
        }
        Ok(self.inner.lock().values.get(&store).and_then(|m| m.get(key)).cloned())
    }

    /// A page of entries in key order (`CoreService::scan_state`).
    pub(super) async fn scan(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<(String, Bytes)>> {
        if store == StateStore::Sessions {
            let disk = self.sessions.clone();
            return tokio::task::spawn_blocking(move || disk.scan(after.as_deref(), limit))
                .await
                .unwrap_or_else(|e| Err(BackendError::Storage(e.to_string())));
        }
        let inner = self.inner.lock();
        Ok(match inner.values.get(&store) {
            Some(m) => crate::backend::scan_entries(m.iter(), after.as_deref(), limit),
            None => Vec::new(),
        })
    }

    /// The current entries, and every later change sent to `updates`. For the sessions store
    /// the snapshot is read from disk whole: the gateway's own tasks page through it with
    /// [`StateView::scan`] instead.
    pub(super) async fn watch(
        &self,
        store: StateStore,
        updates: mpsc::Sender<StateUpdate>,
    ) -> Result<Vec<(String, Bytes)>> {
        if store == StateStore::Sessions {
            self.inner.lock().watchers.entry(store).or_default().push(updates);
            let disk = self.sessions.clone();
            return tokio::task::spawn_blocking(move || disk.scan(None, usize::MAX))
                .await
                .unwrap_or_else(|e| Err(BackendError::Storage(e.to_string())));
        }
        let mut inner = self.inner.lock();
        inner.watchers.entry(store).or_default().push(updates);
        Ok(inner
            .values
            .get(&store)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }
}

/// The key, value and position of a sessions-topic message.
fn session_change(m: &BorrowedMessage<'_>) -> Option<SessionChange> {
    Some(SessionChange {
        partition: u32::try_from(m.partition()).ok()?,
        offset: u64::try_from(m.offset()).ok()?,
        key: m.key().and_then(|k| String::from_utf8(k.to_vec()).ok()),
        value: m.payload().map(Bytes::copy_from_slice),
    })
}
