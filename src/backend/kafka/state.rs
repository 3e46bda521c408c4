//! Keyed state in compacted Kafka topics, materialised locally.
//!
//! One consumer reads every partition of the five state topics and keeps the latest value per
//! key (a tombstone deletes it) — the same view on every gateway. The stores that grow with the
//! fleet, sessions, retained messages and device credentials ([`DISK_STORES`]), are kept on
//! disk ([`DiskState`]) and read from where their files left off; the others (revoked tokens,
//! delay checkpoints) are read from the beginning into memory.
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

use crate::backend::diskstate::{DiskState, DiskStore, OwnedChange};
use crate::backend::{BackendError, Result, StateStore, StateUpdate};
use crate::config::KafkaStateTopics;

/// Messages taken from the consumer at once (one disk transaction per disk store among them).
const MAX_BATCH: usize = 2048;
/// Stores kept on disk rather than in memory: those that grow with the fleet.
pub(super) const DISK_STORES: [StateStore; 3] = [StateStore::Sessions, StateStore::Retained, StateStore::Credentials];

pub(super) struct StateView {
    topics: [(StateStore, String); 5],
    inner: parking_lot::Mutex<Inner>,
    /// The [`DISK_STORES`] (values and the offsets read), in that order.
    disk: Vec<DiskStore>,
    /// Bumped after every applied batch, so waiters re-check their positions.
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
    /// `disk`: the files of the [`DISK_STORES`], in that order.
    pub(super) fn new(names: &KafkaStateTopics, disk: Vec<DiskState>) -> Result<Arc<StateView>> {
        let mut read: HashMap<(StateStore, i32), i64> = HashMap::new();
        for (store, file) in DISK_STORES.iter().zip(&disk) {
            for (p, o) in file.offsets().unwrap_or_default() {
                read.insert((*store, p as i32), i64::try_from(o).unwrap_or(i64::MAX));
            }
        }
        let disk = DISK_STORES
            .iter()
            .zip(disk)
            .map(|(store, file)| DiskStore::start(&format!("{store:?}").to_lowercase(), file))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(StateView {
            disk,
            topics: [
                (StateStore::Sessions, names.sessions.clone()),
                (StateStore::Retained, names.retained.clone()),
                (StateStore::Credentials, names.credentials.clone()),
                (StateStore::RevokedTokens, names.revoked_tokens.clone()),
                (StateStore::Delay, names.delay.clone()),
            ],
            inner: parking_lot::Mutex::new(Inner { consumed: read, ..Inner::default() }),
            progress: watch::channel(0).0,
        }))
    }

    pub(super) fn topic(&self, store: StateStore) -> &str {
        self.topics.iter().find(|(s, _)| *s == store).map(|(_, t)| t.as_str()).unwrap_or_default()
    }

    fn store_of(&self, topic: &str) -> Option<StateStore> {
        self.topics.iter().find(|(_, t)| t == topic).map(|(s, _)| *s)
    }

    fn disk(&self, store: StateStore) -> Option<&DiskStore> {
        self.disk.get(DISK_STORES.iter().position(|s| *s == store)?)
    }

    /// Where a disk store's file left off, per partition (`ends`: the topic's end offsets now).
    /// Offsets beyond the end mean the topic was created again since: the file is emptied and
    /// the topic read from the beginning.
    pub(super) fn check_disk(&self, store: StateStore, ends: &[(i32, i64)]) -> Result<()> {
        let Some(disk) = self.disk(store) else { return Ok(()) };
        let beyond = {
            let inner = self.inner.lock();
            ends.iter().any(|(p, end)| inner.consumed.get(&(store, *p)).is_some_and(|o| o > end))
        };
        if beyond {
            tracing::warn!(?store, "state cache is ahead of its topic (topic created again?): reading it again");
            disk.file()?.clear()?;
            self.inner.lock().consumed.retain(|(s, _), _| *s != store);
        }
        Ok(())
    }

    /// Assign every partition of the state topics: the disk stores' topics from where their
    /// files left off, the others from the beginning.
    pub(super) fn assign(&self, consumer: &StreamConsumer, partitions: &HashMap<String, u32>) -> Result<()> {
        let mut list = TopicPartitionList::new();
        let inner = self.inner.lock();
        for (store, topic) in &self.topics {
            let n = partitions.get(topic).copied().unwrap_or(1);
            for p in 0..n {
                let from = match inner.consumed.get(&(*store, p as i32)) {
                    Some(o) if DISK_STORES.contains(store) => Offset::Offset(*o),
                    _ => Offset::Beginning,
                };
                list.add_partition_offset(topic, p as i32, from).map_err(|e| BackendError::unavailable_from("", e))?;
            }
        }
        consumer.assign(&list).map_err(|e| BackendError::unavailable_from("", e))
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
            let mut to_disk: Vec<Vec<OwnedChange>> = vec![Vec::new(); DISK_STORES.len()];
            for m in &batch {
                if let Some(store) = self.store_of(m.topic()) {
                    match DISK_STORES.iter().position(|s| *s == store) {
                        Some(i) => to_disk[i].extend(disk_change(m)),
                        None => updates.extend(self.apply(store, m)),
                    }
                }
            }
            drop(batch);
            for (store, changes) in DISK_STORES.into_iter().zip(to_disk) {
                if changes.is_empty() {
                    continue;
                }
                self.store_on_disk(store, &changes).await;
                let watchers = self.inner.lock().watchers.get(&store).cloned().unwrap_or_default();
                updates.extend(
                    changes
                        .into_iter()
                        .filter_map(|c| Some((StateUpdate { store, key: c.key?, value: c.value }, watchers.clone()))),
                );
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

    /// Write a disk store's messages to its file (retried until the disk takes them: the
    /// consumer has moved past them), then count them as consumed.
    async fn store_on_disk(&self, store: StateStore, changes: &[OwnedChange]) {
        let Some(disk) = self.disk(store) else { return };
        let owned: Arc<Vec<OwnedChange>> = Arc::new(changes.to_vec());
        loop {
            match disk.write(owned.clone()).await {
                Ok(()) => break,
                Err(BackendError::Closed) => return,
                Err(e) => {
                    tracing::warn!(?store, error = %e, "state cache: cannot write (retrying in 1 s)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let mut inner = self.inner.lock();
        for c in changes {
            let next = inner.consumed.entry((store, c.partition as i32)).or_insert(0);
            *next = (*next).max(i64::try_from(c.offset).unwrap_or(i64::MAX).saturating_add(1));
        }
    }

    /// Make the disk stores' files durable and let them go (at shutdown): the directory is
    /// free for the next start once reads in flight end, even while other tasks of this
    /// process still hold the core service.
    pub(super) fn close(&self) {
        for disk in &self.disk {
            disk.close();
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
        if let Some(disk) = self.disk(store) {
            return disk.get(key.to_owned()).await;
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
        if let Some(disk) = self.disk(store) {
            return disk.scan("", after, limit).await;
        }
        let inner = self.inner.lock();
        Ok(match inner.values.get(&store) {
            Some(m) => crate::backend::scan_entries(m.iter(), after.as_deref(), limit),
            None => Vec::new(),
        })
    }

    /// Every change consumed from now on sent to `updates` (`CoreService::follow_state`).
    pub(super) fn follow(&self, store: StateStore, updates: mpsc::Sender<StateUpdate>) {
        self.inner.lock().watchers.entry(store).or_default().push(updates);
    }

    /// The current entries, and every later change sent to `updates`. For a disk store the
    /// snapshot is read from disk whole; the router pages through the retained store instead
    /// ([`StateView::follow`] and [`StateView::scan`]).
    pub(super) async fn watch(
        &self,
        store: StateStore,
        updates: mpsc::Sender<StateUpdate>,
    ) -> Result<Vec<(String, Bytes)>> {
        if let Some(disk) = self.disk(store) {
            self.inner.lock().watchers.entry(store).or_default().push(updates);
            return disk.scan("", None, usize::MAX).await;
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

/// The key, value and position of a disk store's message.
fn disk_change(m: &BorrowedMessage<'_>) -> Option<OwnedChange> {
    Some(OwnedChange {
        partition: u32::try_from(m.partition()).ok()?,
        offset: u64::try_from(m.offset()).ok()?,
        key: m.key().and_then(|k| String::from_utf8(k.to_vec()).ok()),
        value: m.payload().map(Bytes::copy_from_slice),
        if_prefix: None,
    })
}
