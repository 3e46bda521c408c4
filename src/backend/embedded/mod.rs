//! The embedded core service: an on-disk, partitioned, append-only log plus compacted
//! key-value state, all inside the gateway process (no external broker).
//!
//! # Layout of `data_dir`
//!
//! ```text
//! log/<topic>/meta.json                       {"partitions": N}
//! log/<topic>/<partition>/<base_offset:020>.seg   segment files (see `segment`)
//! state/sessions.kv, retained.kv,              compacted key-value stores (see `state`)
//!   credentials.kv, revoked_tokens.kv
//! ```
//!
//! Topic names are restricted to letters, digits, `-`, `_` and `.` (not `.` / `..`) so a
//! name can never escape the directory.
//!
//! # Write path
//!
//! Each partition has a writer task fed by a bounded queue (a full queue makes `append`
//! wait: back-pressure, never loss). The writer batches whatever is queued, writes it with
//! one `write` (plus `sync_data` with `fsync: always`, the group commit), then publishes the
//! records (high watermark, in-memory cache of the last `cache_records` records, at most `cache_bytes`) and only
//! then acknowledges. With `fsync: interval` a timer syncs every `fsync_interval_ms` and
//! appends are acknowledged after the write; with `never` the OS flushes. Segments roll at
//! `segment_bytes`. The partition of a keyed record is FNV-1a(key) % partitions; records
//! without a key go round-robin.
//!
//! # Read path
//!
//! `fetch` serves from the cache when the offset is in it, otherwise from the segments via
//! the sparse index on the blocking pool. Live records are pushed: a partition's writer hands
//! each batch it makes visible to the registered [`LiveSink`]s (the router) in its own task,
//! before the acknowledgements, so a delivery waits for no other task
//! ([`CoreService::push_to`]). A [`Tail`] (for callers that poll) keeps next offsets per
//! assigned partition and waits on a per-tail `Notify` registered with those partitions.
//!
//! # Recovery, retention, health
//!
//! `open` scans every segment (crc, consecutive offsets), truncates a torn tail of a
//! partition's last segment and rebuilds the indexes; state files are replayed likewise.
//! Retention runs at open and every minute, deleting sealed segments whose newest record is
//! older than `retention_hours` (0 = keep forever). A failed write fails its appends with
//! [`BackendError::Storage`] and makes [`CoreService::is_available`] false until a later
//! write succeeds.

// Visible to the crate for `crate::fuzzing` (frame and state decoders).
pub(crate) mod partition;
pub(crate) mod segment;
pub(crate) mod state;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use self::partition::{AppendReq, Partition, PartitionSettings};
use self::state::KvStore;
use super::{
    AppendAck, BackendError, CoreRecord, CoreService, Fetched, LiveSink, Record, Result, StateStore, StateUpdate, Tail,
    TopicPartition,
};
use crate::config::EmbeddedConfig;
use crate::events::ClientEvent;
use crate::now_ms;

/// How often retention runs.
const RETENTION_PERIOD: Duration = Duration::from_secs(60);
/// Most records one [`Tail::poll`] returns.
const TAIL_MAX_RECORDS: usize = 1024;
/// Longest accepted topic name.
const MAX_TOPIC_NAME: usize = 249;
/// Most partitions of one topic.
const MAX_PARTITIONS: u32 = 4096;
const META_FILE: &str = "meta.json";

/// Topic metadata stored in `log/<topic>/meta.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct TopicMeta {
    partitions: u32,
}

/// One topic: its partitions and the round-robin counter for unkeyed records.
struct Topic {
    partitions: Vec<Arc<Partition>>,
    round_robin: AtomicU32,
}

/// One of each state store.
struct Stores<T> {
    sessions: T,
    retained: T,
    credentials: T,
    revoked_tokens: T,
    delay: T,
}

impl<T> Stores<T> {
    fn map<U>(self, f: impl Fn(T) -> U) -> Stores<U> {
        Stores {
            sessions: f(self.sessions),
            retained: f(self.retained),
            credentials: f(self.credentials),
            revoked_tokens: f(self.revoked_tokens),
            delay: f(self.delay),
        }
    }

    fn all(&self) -> [&T; 5] {
        [&self.sessions, &self.retained, &self.credentials, &self.revoked_tokens, &self.delay]
    }
}

/// State shared by the service, its tails and its background tasks.
struct Shared {
    log_dir: PathBuf,
    settings: PartitionSettings,
    retention_ms: Option<i64>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    stores: Stores<Arc<KvStore>>,
    events_topic: String,
    closed: AtomicBool,
    healthy: Arc<AtomicBool>,
    /// Every live tail, woken on shutdown and when topics appear.
    tails: Mutex<Vec<Weak<Notify>>>,
    /// Serialises topic creation.
    topic_lock: tokio::sync::Mutex<()>,
}

/// The embedded core service. Create with [`EmbeddedCore::open`].
pub struct EmbeddedCore {
    shared: Arc<Shared>,
    retention_task: Mutex<Option<JoinHandle<()>>>,
    shutdown_lock: tokio::sync::Mutex<()>,
}

/// Whether `name` is a valid topic name (also a safe directory name).
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn check_topic_name(name: &str) -> Result<()> {
    if valid_topic_name(name) {
        Ok(())
    } else {
        Err(BackendError::storage(format!("invalid topic name `{name}`: use letters, digits, `-`, `_`, `.`")))
    }
}

/// FNV-1a, 32 bit: stable across versions and processes.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Recover (or create) a topic's partitions `0..partitions` and write its metadata. Blocking.
fn open_topic_blocking(
    log_dir: &Path,
    name: &str,
    existing: &[Arc<Partition>],
    partitions: u32,
    settings: &PartitionSettings,
) -> io::Result<Vec<Partition>> {
    let topic_dir = log_dir.join(name);
    std::fs::create_dir_all(&topic_dir)?;
    let mut out = Vec::new();
    for p in existing.len() as u32..partitions {
        out.push(Partition::recover(TopicPartition::new(name, p), topic_dir.join(p.to_string()), settings.clone())?);
    }
    let meta = serde_json::to_vec(&TopicMeta { partitions }).map_err(io::Error::other)?;
    let tmp = topic_dir.join("meta.json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&meta)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, topic_dir.join(META_FILE))?;
    partition::sync_dir(&topic_dir);
    Ok(out)
}

/// Partitions of every topic found on disk.
type RecoveredTopics = HashMap<String, Vec<Partition>>;

/// Everything `open` recovers from disk. Blocking.
fn recover_blocking(
    log_dir: &Path,
    state_dir: &Path,
    config: &EmbeddedConfig,
    settings: &PartitionSettings,
) -> io::Result<(RecoveredTopics, Stores<KvStore>)> {
    std::fs::create_dir_all(log_dir)?;
    let mut topics = HashMap::new();
    for entry in std::fs::read_dir(log_dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !entry.file_type()?.is_dir() || !valid_topic_name(&name) {
            continue;
        }
        let meta_path = entry.path().join(META_FILE);
        let meta: TopicMeta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", meta_path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(dir = %entry.path().display(), "log directory without meta.json ignored");
                continue;
            }
            Err(e) => return Err(e),
        };
        let partitions = open_topic_blocking(log_dir, &name, &[], meta.partitions.max(1), settings)?;
        topics.insert(name, partitions);
    }
    let interval = Duration::from_millis(config.fsync_interval_ms);
    let load = |store| KvStore::load(store, state_dir, config.fsync, interval);
    let stores = Stores {
        sessions: load(StateStore::Sessions)?,
        retained: load(StateStore::Retained)?,
        credentials: load(StateStore::Credentials)?,
        revoked_tokens: load(StateStore::RevokedTokens)?,
        delay: load(StateStore::Delay)?,
    };
    Ok((topics, stores))
}

impl EmbeddedCore {
    /// Open the service on `config.data_dir` (created if missing), recovering every topic
    /// and state store, and make sure `events_topic` exists (1 partition if new).
    pub async fn open(config: &EmbeddedConfig, events_topic: &str) -> Result<Arc<EmbeddedCore>> {
        check_topic_name(events_topic)?;
        let settings = PartitionSettings {
            fsync: config.fsync,
            fsync_interval: Duration::from_millis(config.fsync_interval_ms.max(1)),
            segment_bytes: config.segment_bytes.max(1),
            cache_records: config.cache_records,
            cache_bytes: config.cache_bytes,
        };
        let log_dir = config.data_dir.join("log");
        let state_dir = config.data_dir.join("state");
        let (topics, stores) = {
            let (log_dir, state_dir, config, settings) =
                (log_dir.clone(), state_dir.clone(), config.clone(), settings.clone());
            tokio::task::spawn_blocking(move || recover_blocking(&log_dir, &state_dir, &config, &settings))
                .await
                .map_err(|e| BackendError::storage_from("recovery task failed", e))??
        };
        let healthy = Arc::new(AtomicBool::new(true));
        let topics = topics
            .into_iter()
            .map(|(name, parts)| {
                let partitions: Vec<_> = parts.into_iter().map(Arc::new).collect();
                for p in &partitions {
                    p.start(Arc::clone(&healthy));
                }
                let topic = Topic { partitions, round_robin: AtomicU32::new(0) };
                (name, Arc::new(topic))
            })
            .collect();
        let stores = stores.map(Arc::new);
        for kv in stores.all() {
            kv.start(Arc::clone(&healthy));
        }
        let retention_ms = match config.retention_hours {
            0 => None,
            h => Some(i64::try_from(h.saturating_mul(3_600_000)).unwrap_or(i64::MAX)),
        };
        let shared = Arc::new(Shared {
            log_dir,
            settings,
            retention_ms,
            topics: RwLock::new(topics),
            stores,
            events_topic: events_topic.to_owned(),
            closed: AtomicBool::new(false),
            healthy,
            tails: Mutex::new(Vec::new()),
            topic_lock: tokio::sync::Mutex::new(()),
        });
        let core = Arc::new(EmbeddedCore {
            shared: Arc::clone(&shared),
            retention_task: Mutex::new(None),
            shutdown_lock: tokio::sync::Mutex::new(()),
        });
        if !shared.topics.read().contains_key(events_topic) {
            shared.ensure_topic(events_topic, 1).await?;
        }
        let weak = Arc::downgrade(&shared);
        *core.retention_task.lock() = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETENTION_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The first tick fires at once: retention also runs at open.
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { break };
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                shared.run_retention(now_ms()).await;
            }
        }));
        Ok(core)
    }

    /// Run retention as if the time were `now_ms`; returns deleted segment count.
    #[cfg(test)]
    async fn run_retention_at(&self, now_ms: i64) -> usize {
        self.shared.run_retention(now_ms).await
    }

    #[cfg(test)]
    fn partition(&self, tp: &TopicPartition) -> Result<Arc<Partition>> {
        self.shared.partition(tp)
    }
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics.read().get(name).cloned().ok_or_else(|| BackendError::unknown_topic(name))
    }

    fn partition(&self, tp: &TopicPartition) -> Result<Arc<Partition>> {
        self.topic(&tp.topic)?
            .partitions
            .get(tp.partition as usize)
            .cloned()
            .ok_or_else(|| BackendError::unknown_topic(tp.to_string()))
    }

    async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<()> {
        check_topic_name(name)?;
        let partitions = partitions.clamp(1, MAX_PARTITIONS);
        let _guard = self.topic_lock.lock().await;
        self.check_open()?;
        let existing = match self.topics.read().get(name) {
            Some(t) if t.partitions.len() >= partitions as usize => return Ok(()),
            Some(t) => t.partitions.clone(),
            None => Vec::new(),
        };
        let (log_dir, topic, settings, existing_for_open) =
            (self.log_dir.clone(), name.to_owned(), self.settings.clone(), existing.clone());
        let new = tokio::task::spawn_blocking(move || {
            open_topic_blocking(&log_dir, &topic, &existing_for_open, partitions, &settings)
        })
        .await
        .map_err(|e| BackendError::storage_from("topic creation task failed", e))??;
        let mut all = existing;
        for p in new {
            let p = Arc::new(p);
            p.start(Arc::clone(&self.healthy));
            all.push(p);
        }
        let old_rr = self.topics.read().get(name).map_or(0, |t| t.round_robin.load(Ordering::Relaxed));
        self.topics
            .write()
            .insert(name.to_owned(), Arc::new(Topic { partitions: all, round_robin: AtomicU32::new(old_rr) }));
        tracing::info!(topic = name, partitions, "core topic ready");
        self.wake_all_tails();
        Ok(())
    }

    fn wake_all_tails(&self) {
        self.tails.lock().retain(|w| match w.upgrade() {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        });
    }

    fn append(&self, topic: &str, record: &CoreRecord) -> Result<mpsc::Sender<AppendReq>> {
        self.check_open()?;
        partition::check_record(record)?;
        let topic = self.topic(topic)?;
        let n = topic.partitions.len() as u32;
        let p = match &record.key {
            Some(key) => fnv1a(key) % n,
            None => topic.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        topic.partitions.get(p as usize).and_then(|p| p.sender()).ok_or(BackendError::Closed)
    }

    fn store(&self, store: StateStore) -> &Arc<KvStore> {
        match store {
            StateStore::Sessions => &self.stores.sessions,
            StateStore::Retained => &self.stores.retained,
            StateStore::Credentials => &self.stores.credentials,
            StateStore::RevokedTokens => &self.stores.revoked_tokens,
            StateStore::Delay => &self.stores.delay,
        }
    }

    async fn run_retention(&self, now_ms: i64) -> usize {
        let Some(retention_ms) = self.retention_ms else {
            return 0;
        };
        let partitions: Vec<Arc<Partition>> =
            self.topics.read().values().flat_map(|t| t.partitions.iter().cloned()).collect();
        tokio::task::spawn_blocking(move || partitions.iter().map(|p| p.apply_retention(now_ms, retention_ms)).sum())
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "retention task failed");
                0
            })
    }
}

impl CoreService for EmbeddedCore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn ensure_topic(&self, topic: &str, partitions: u32) -> BoxFuture<'_, Result<()>> {
        let topic = topic.to_owned();
        Box::pin(async move { self.shared.ensure_topic(&topic, partitions).await })
    }

    fn partitions(&self, topic: &str) -> Result<u32> {
        self.shared.check_open()?;
        Ok(self.shared.topic(topic)?.partitions.len() as u32)
    }

    fn enqueue(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<AppendAck>> {
        let sender = self.shared.append(topic, &record);
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            // The writer's queue is FIFO: once `send` returns, the record's place is fixed.
            sender?.send(AppendReq { record, done }).await.map_err(|_| BackendError::Closed)?;
            Ok(Box::pin(async move { rx.await.map_err(|_| BackendError::Closed)? }) as AppendAck)
        })
    }

    fn fetch(&self, tp: &TopicPartition, from: u64, max_records: usize) -> BoxFuture<'static, Result<Fetched>> {
        let part = self.shared.check_open().and_then(|()| self.shared.partition(tp));
        Box::pin(async move { part?.fetch(from, max_records).await })
    }

    fn end_offset(&self, tp: &TopicPartition) -> BoxFuture<'static, Result<u64>> {
        let end = self.shared.check_open().and_then(|()| self.shared.partition(tp)).map(|p| p.high_watermark());
        Box::pin(async move { end })
    }

    fn push_to(&self, tp: &TopicPartition, sink: Weak<dyn LiveSink>) -> Option<Result<u64>> {
        let part = self.shared.check_open().and_then(|()| self.shared.partition(tp));
        Some(part.map(|p| p.push_to(sink)))
    }

    fn tail(&self) -> Box<dyn Tail> {
        let notify = Arc::new(Notify::new());
        self.shared.tails.lock().push(Arc::downgrade(&notify));
        Box::new(EmbeddedTail { shared: Arc::clone(&self.shared), notify, assigned: BTreeMap::new(), start_at: 0 })
    }

    fn put_state(&self, store: StateStore, key: &str, value: Option<Bytes>) -> BoxFuture<'static, Result<()>> {
        let kv = self.shared.check_open().map(|()| Arc::clone(self.shared.store(store)));
        let key = key.to_owned();
        Box::pin(async move { kv?.put(key, value).await })
    }

    fn get_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        let value = self.shared.check_open().map(|()| self.shared.store(store).get(key));
        Box::pin(async move { value })
    }

    fn peek_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        self.get_state(store, key)
    }

    fn scan_state(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let page = self.shared.check_open().map(|()| self.shared.store(store).scan(after.as_deref(), limit));
        Box::pin(async move { page })
    }

    fn watch_state(
        &self,
        store: StateStore,
        updates: mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let snapshot = self.shared.check_open().map(|()| self.shared.store(store).watch(updates));
        Box::pin(async move { snapshot })
    }

    fn emit_event(&self, event: ClientEvent) -> BoxFuture<'static, Result<()>> {
        let fut = self.append(&self.shared.events_topic, event.to_record());
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    fn is_available(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire) && self.shared.healthy.load(Ordering::Acquire)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _guard = self.shutdown_lock.lock().await;
            if self.shared.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            if let Some(task) = self.retention_task.lock().take() {
                task.abort();
            }
            let partitions: Vec<Arc<Partition>> = {
                let _topics_guard = self.shared.topic_lock.lock().await;
                self.shared.topics.read().values().flat_map(|t| t.partitions.iter().cloned()).collect()
            };
            let closes = partitions.iter().map(|p| p.close());
            futures::future::join_all(closes).await;
            for kv in self.shared.stores.all() {
                kv.close().await;
            }
            self.shared.wake_all_tails();
            tracing::info!("embedded core service stopped");
        })
    }
}

impl Drop for EmbeddedCore {
    /// Without [`CoreService::shutdown`], still stop the writers (they drain their queues,
    /// sync and exit on their own) so nothing keeps running detached forever.
    fn drop(&mut self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(task) = self.retention_task.lock().take() {
            task.abort();
        }
        for topic in self.shared.topics.read().values() {
            for p in &topic.partitions {
                p.stop_accepting();
            }
        }
        for kv in self.shared.stores.all() {
            kv.stop_accepting();
        }
        self.shared.wake_all_tails();
    }
}

/// A live tail over the embedded log.
struct EmbeddedTail {
    shared: Arc<Shared>,
    /// Woken by the assigned partitions when records become visible.
    notify: Arc<Notify>,
    /// Next offset per assigned partition (partition resolved lazily: the topic may not
    /// exist yet when assigned).
    assigned: BTreeMap<TopicPartition, (u64, Option<Arc<Partition>>)>,
    /// Rotates the partition polled first, for fairness.
    start_at: usize,
}

impl EmbeddedTail {
    /// Records available right now, without waiting. Offsets advance only on return, so a
    /// cancelled call loses nothing.
    async fn poll_once(&mut self) -> Result<Vec<Arc<Record>>> {
        self.shared.check_open()?;
        let n = self.assigned.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let start = self.start_at % n;
        self.start_at = self.start_at.wrapping_add(1);
        let mut out = Vec::new();
        let mut advanced = Vec::new();
        let keys: Vec<TopicPartition> = self.assigned.keys().cloned().collect();
        for i in 0..n {
            let budget = TAIL_MAX_RECORDS - out.len();
            if budget == 0 {
                break;
            }
            let tp = &keys[(start + i) % n];
            let Some((next, part)) = self.assigned.get_mut(tp) else {
                continue;
            };
            if part.is_none() {
                if let Ok(p) = self.shared.partition(tp) {
                    p.add_waiter(&self.notify);
                    *part = Some(p);
                }
            }
            let Some(part) = part.clone() else { continue };
            let next = *next;
            if part.high_watermark() <= next {
                continue;
            }
            let fetched = part.fetch(next, budget).await?;
            if fetched.next_offset != next {
                advanced.push((tp.clone(), fetched.next_offset));
            }
            out.extend(fetched.records);
        }
        for (tp, next) in advanced {
            if let Some(entry) = self.assigned.get_mut(&tp) {
                entry.0 = next;
            }
        }
        Ok(out)
    }
}

impl Tail for EmbeddedTail {
    fn assign(&mut self, tp: TopicPartition, from: u64) {
        let part = self.shared.partition(&tp).ok();
        if let Some(p) = &part {
            p.add_waiter(&self.notify);
        }
        self.assigned.insert(tp, (from, part));
        // Let a waiting poll look at the new assignment.
        self.notify.notify_one();
    }

    fn unassign(&mut self, tp: &TopicPartition) {
        if let Some((_, Some(part))) = self.assigned.remove(tp) {
            part.remove_waiter(&self.notify);
        }
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>> {
        Box::pin(async move {
            loop {
                let records = self.poll_once().await?;
                if !records.is_empty() {
                    return Ok(records);
                }
                // A permit stored since the last wait makes this return at once, so a record
                // published between `poll_once` and here is not missed.
                self.notify.notified().await;
            }
        })
    }
}

impl Drop for EmbeddedTail {
    fn drop(&mut self) {
        for (_, part) in self.assigned.values() {
            if let Some(part) = part {
                part.remove_waiter(&self.notify);
            }
        }
    }
}

#[cfg(test)]
mod tests;
