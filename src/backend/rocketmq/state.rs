//! Keyed state (sessions, retained messages, credentials, revoked tokens) on a RocketMQ topic.
//!
//! Classic RocketMQ brokers have no compacted topics, so the state topic (one queue) is a log
//! of changes: tag = store, key = state key, a `lmqStateOp` of `put` or `delete`. Every
//! gateway follows it into a local, disposable copy on disk ([`DiskState`], one file for all
//! stores, keys `<store>/<key>`), the same content on every gateway because all apply the same
//! log in the same order. The copy remembers the next offset to read, so a restart reads only
//! what was written since; a copy from before the broker's retention removed records it never
//! read, or from beyond the queue's end (the topic was created again), is emptied and the
//! topic read from its oldest record.
//!
//! - `put_state` sends a change and waits until this gateway's copy has applied it.
//! - `get_state` asks the broker for the queue's end and waits until the copy has applied
//!   everything before it: a change acknowledged on any gateway is seen (read-your-writes
//!   across gateways), at the cost of one round trip.
//! - `watch_state` = every later change, then the entries read from the copy (an update may
//!   repeat what the snapshot holds; the last one a watcher applies is the latest).
//! - Retention: the broker deletes whole commit-log files after `fileReservedTime`. A live
//!   entry whose record is older than `state_refresh_hours` is written again as a *refresh*
//!   naming the offset it copies; a refresh applies only while the entry still comes from that
//!   offset, so a refresh racing a newer write (from any gateway) is ignored everywhere.
//!   Deletions need no refresh: once the older records are gone the key is gone too.
//!   Each stored value starts with a [`STAMP`]: the offset and time of its record.
//!
//! Limits: a cold start (no copy) reads the whole retained state topic (time ∝ state traffic
//! within the retention); every entry must be refreshed by *some* running gateway within the
//! retention.

use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::client::{self, Client};
use super::record::from_message;
use crate::backend::diskstate::{DiskState, DiskStore, OwnedChange};
use crate::backend::{BackendError, CoreRecord, Result, StateStore, StateUpdate, TopicPartition};
use crate::now_ms;
use rocketmq_client_rust::PullStatus;

const OP: &str = "lmqStateOp";
const STORE: &str = "lmqStateStore";
const REFRESH_OF: &str = "lmqStateRefreshOf";
/// How often entries are checked for refreshing.
const REFRESH_PERIOD: Duration = Duration::from_secs(600);

pub fn store_name(store: StateStore) -> &'static str {
    match store {
        StateStore::Sessions => "sessions",
        StateStore::Retained => "retained",
        StateStore::Credentials => "credentials",
        StateStore::RevokedTokens => "revoked_tokens",
        StateStore::Delay => "delay",
    }
}

fn store_of(name: &[u8]) -> Option<StateStore> {
    StateStore::ALL.into_iter().find(|s| store_name(*s).as_bytes() == name)
}

/// The record of a change.
pub fn change_record(store: StateStore, key: &str, value: Option<Bytes>, refresh_of: Option<u64>) -> CoreRecord {
    let mut headers = vec![
        (STORE.to_owned(), Bytes::from_static(store_name(store).as_bytes())),
        (OP.to_owned(), Bytes::from_static(if value.is_some() { b"put" } else { b"delete" })),
    ];
    if let Some(o) = refresh_of {
        headers.push((REFRESH_OF.to_owned(), Bytes::from(o.to_string())));
    }
    CoreRecord {
        key: Some(Bytes::from(key.to_owned())),
        headers,
        value: value.unwrap_or_default(),
        timestamp_ms: now_ms(),
    }
}

/// Bytes before a stored value: the offset (u64) and time (i64, ms) of its record, big-endian.
const STAMP: usize = 16;
/// Changes written to the copy in one transaction while catching up.
const MAX_BATCH: usize = 2048;

fn disk_key(store: StateStore, key: &str) -> String {
    format!("{}/{key}", store_name(store))
}

fn stamped(offset: u64, written_ms: i64, value: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(STAMP + value.len());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&written_ms.to_be_bytes());
    v.extend_from_slice(value);
    Bytes::from(v)
}

/// (offset, time, value) of a stored value.
fn unstamp(stored: &Bytes) -> Option<(u64, i64, Bytes)> {
    let offset = u64::from_be_bytes(stored.get(..8)?.try_into().ok()?);
    let written = i64::from_be_bytes(stored.get(8..STAMP)?.try_into().ok()?);
    Some((offset, written, stored.slice(STAMP..)))
}

/// What the record at `offset` does to the copy, and the update watchers hear of (`None` for a
/// refresh, which changes no value). `None` for a record that is no state change.
fn change_of(offset: u64, rec: &CoreRecord) -> Option<(OwnedChange, Option<StateUpdate>)> {
    let store = rec.header(STORE).and_then(|s| store_of(s))?;
    let key = rec.key.as_ref().and_then(|k| std::str::from_utf8(k).ok())?;
    let delete = rec.header(OP).is_some_and(|op| op.as_ref() == b"delete");
    let refresh_of = rec.header(REFRESH_OF).and_then(|o| std::str::from_utf8(o).ok()?.parse::<u64>().ok());
    if delete && refresh_of.is_some() {
        return None; // no such record: a refresh renews a value
    }
    let change = OwnedChange {
        partition: 0,
        offset,
        key: Some(disk_key(store, key)),
        value: (!delete).then(|| stamped(offset, rec.timestamp_ms, &rec.value)),
        // A refresh changes no value: it only renews the record the entry comes from, and
        // only while the entry still comes from the record it copied.
        if_prefix: refresh_of.map(|of| Bytes::copy_from_slice(&of.to_be_bytes())),
    };
    let update = refresh_of.is_none().then(|| StateUpdate {
        store,
        key: key.to_owned(),
        value: (!delete).then(|| rec.value.clone()),
    });
    Some((change, update))
}

/// The local copy of the state topic and the task that keeps it current.
pub struct StateView {
    client: Arc<Client>,
    tp: TopicPartition,
    disk: DiskStore,
    watchers: Mutex<Vec<(StateStore, mpsc::Sender<StateUpdate>)>>,
    /// Next offset to apply (everything below is in the copy).
    applied: watch::Sender<u64>,
    /// Cleared while the state topic cannot be read (the broker is away), set again on success.
    healthy: Arc<AtomicBool>,
}

impl StateView {
    pub fn new(client: Arc<Client>, topic: &str, healthy: Arc<AtomicBool>, file: DiskState) -> Result<Arc<StateView>> {
        let next = file.offsets()?.get(&0).copied().unwrap_or(0);
        Ok(Arc::new(StateView {
            client,
            tp: TopicPartition::new(topic, 0),
            disk: DiskStore::start("rocketmq", file)?,
            watchers: Mutex::new(Vec::new()),
            applied: watch::channel(next).0,
            healthy,
        }))
    }

    /// Follow the state topic until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let hold = Duration::from_millis(self.client.config.poll_suspend_ms.max(1));
        let mut next = *self.applied.borrow();
        let mut pending: Vec<(OwnedChange, Option<StateUpdate>)> = Vec::new();
        loop {
            let mq = match self.client.queue(&self.tp).await {
                Ok(mq) => mq,
                Err(e) => {
                    tracing::warn!(error = %e, "state topic unavailable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            let pulled = tokio::select! {
                r = self.client.pull(&mq, next, client::PULL_MAX, (pending.is_empty()).then_some(hold)) => r,
                _ = stop.cancelled() => return,
            };
            self.healthy.store(pulled.is_ok(), Ordering::Release);
            match pulled {
                Ok(r) => match r.pull_status() {
                    PullStatus::Found => {
                        let found = r.msg_found_list().unwrap_or_default();
                        let full = found.len() >= client::PULL_MAX as usize;
                        for m in found {
                            let Ok(offset) = u64::try_from(m.queue_offset()) else { continue };
                            if offset < next {
                                continue;
                            }
                            pending.extend(change_of(offset, &from_message(m)));
                            next = offset + 1;
                        }
                        next = next.max(r.next_begin_offset());
                        // While catching up, a transaction per pull would be the bottleneck.
                        if !full || pending.len() >= MAX_BATCH {
                            self.apply(std::mem::take(&mut pending), next).await;
                        }
                    }
                    PullStatus::NoNewMsg | PullStatus::NoMatchedMsg => {
                        next = next.max(r.next_begin_offset());
                        self.apply(std::mem::take(&mut pending), next).await;
                    }
                    PullStatus::OffsetIllegal => {
                        self.apply(std::mem::take(&mut pending), next).await;
                        if next < r.min_offset() || next > r.max_offset() {
                            // Records the copy never read are gone (the gateway was away
                            // longer than the retention), or the copy is ahead of the queue
                            // (the topic was created again): read from the oldest record.
                            if next > 0 {
                                tracing::warn!(
                                    next,
                                    min = r.min_offset(),
                                    max = r.max_offset(),
                                    "state copy does not match the state topic: reading it again"
                                );
                                if let Err(e) = self.disk.file().and_then(|f| f.clear()) {
                                    tracing::warn!(error = %e, "state copy cannot be emptied; retrying");
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                    continue;
                                }
                            }
                            next = r.min_offset();
                            self.applied.send_replace(next);
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "state topic pull failed; retrying");
                    self.apply(std::mem::take(&mut pending), next).await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Write changes to the copy (retried until the disk takes them: the view has moved past
    /// them), tell the watchers, then count everything below `next` as applied.
    async fn apply(&self, changes: Vec<(OwnedChange, Option<StateUpdate>)>, next: u64) {
        if !changes.is_empty() {
            let (writes, updates): (Vec<_>, Vec<_>) = changes.into_iter().unzip();
            let writes = Arc::new(writes);
            loop {
                match self.disk.write(writes.clone()).await {
                    Ok(()) => break,
                    Err(BackendError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "state copy: cannot write (retrying in 1 s)");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            for update in updates.into_iter().flatten() {
                let senders: Vec<_> = {
                    let mut watchers = self.watchers.lock();
                    watchers.retain(|(_, tx)| !tx.is_closed());
                    watchers.iter().filter(|(s, _)| *s == update.store).map(|(_, tx)| tx.clone()).collect()
                };
                for tx in senders {
                    // Bounded: a slow watcher delays the view, it never loses a change.
                    let _ = tx.send(update.clone()).await;
                }
            }
        }
        self.applied.send_replace(next);
    }

    /// Wait until everything below `offset` is applied.
    pub async fn wait_applied(&self, offset: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.applied.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= offset)).await.map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(BackendError::Closed),
            Err(_) => Err(BackendError::Timeout(timeout)),
        }
    }

    /// Wait until the copy holds everything the broker has stored so far.
    pub async fn catch_up(&self, timeout: Duration) -> Result<()> {
        let mq = self.client.queue(&self.tp).await?;
        let end = self.client.max_offset(&mq).await?;
        self.wait_applied(end, timeout).await
    }

    /// A key's value in the copy as it is now.
    pub async fn get(&self, store: StateStore, key: &str) -> Result<Option<Bytes>> {
        let stored = self.disk.get(disk_key(store, key)).await?;
        Ok(stored.as_ref().and_then(unstamp).map(|(_, _, v)| v))
    }

    /// A page of entries in key order (`CoreService::scan_state`).
    pub async fn scan(&self, store: StateStore, after: Option<String>, limit: usize) -> Result<Vec<(String, Bytes)>> {
        let prefix = disk_key(store, "");
        let page = self.disk.scan(&prefix, after, limit).await?;
        Ok(page
            .into_iter()
            .filter_map(|(k, stored)| Some((k.strip_prefix(&prefix)?.to_owned(), unstamp(&stored)?.2)))
            .collect())
    }

    /// Every later change of `store` sent to `tx`.
    pub fn follow(&self, store: StateStore, tx: mpsc::Sender<StateUpdate>) {
        self.watchers.lock().push((store, tx));
    }

    /// Every later change of `store` sent to `tx`, and the current entries.
    pub async fn watch(&self, store: StateStore, tx: mpsc::Sender<StateUpdate>) -> Result<Vec<(String, Bytes)>> {
        self.follow(store, tx);
        self.scan(store, None, usize::MAX).await
    }

    /// A page of entries (all stores, in key order after `after`) with those whose record is
    /// older than `age_ms`: (store, key, value, offset); and where the next page starts
    /// (`None`: this was the last).
    pub async fn stale(
        &self,
        after: Option<String>,
        age_ms: i64,
    ) -> Result<(Vec<(StateStore, String, Bytes, u64)>, Option<String>)> {
        const PAGE: usize = 1000;
        let limit_ms = now_ms().saturating_sub(age_ms);
        let page = self.disk.scan("", after, PAGE).await?;
        let next = (page.len() >= PAGE).then(|| page.last().map(|(k, _)| k.clone())).flatten();
        let stale = page
            .into_iter()
            .filter_map(|(k, stored)| {
                let (store, key) = k.split_once('/')?;
                let (offset, written, value) = unstamp(&stored)?;
                let store = store_of(store.as_bytes())?;
                (written < limit_ms).then(|| (store, key.to_owned(), value, offset))
            })
            .collect();
        Ok((stale, next))
    }

    /// Make the copy durable and let it go (at shutdown).
    pub fn close(&self) {
        self.disk.close();
    }
}

/// Period of the refresh check.
pub fn refresh_period() -> Duration {
    REFRESH_PERIOD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::diskstate::Change;

    fn at(rec: CoreRecord, t: i64) -> CoreRecord {
        CoreRecord { timestamp_ms: t, ..rec }
    }

    /// Apply the record at `offset` to the copy; the update watchers would hear of.
    fn apply(file: &DiskState, offset: u64, rec: CoreRecord) -> Option<StateUpdate> {
        let (c, update) = change_of(offset, &rec)?;
        let change = Change {
            partition: c.partition,
            offset: c.offset,
            key: c.key.as_deref()?,
            value: c.value.as_deref(),
            if_prefix: c.if_prefix.as_deref(),
        };
        file.apply(&[change]).unwrap();
        update
    }

    /// (value, offset of its record, time of its record)
    fn stored(file: &DiskState, store: StateStore, key: &str) -> Option<(Bytes, u64, i64)> {
        let (offset, written, value) = unstamp(&file.get(&disk_key(store, key)).unwrap()?)?;
        Some((value, offset, written))
    }

    fn value(file: &DiskState, key: &str) -> Option<Bytes> {
        stored(file, StateStore::Sessions, key).map(|(v, _, _)| v)
    }

    #[test]
    fn puts_deletes_and_separate_stores() {
        let dir = tempfile::tempdir().unwrap();
        let file = DiskState::open(dir.path(), "rocketmq:test").unwrap();
        let v = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        apply(&file, 0, change_record(StateStore::Sessions, "k", v("1"), None));
        apply(&file, 1, change_record(StateStore::Retained, "k", v("r"), None));
        apply(&file, 2, change_record(StateStore::Sessions, "k", v("2"), None));
        assert_eq!(value(&file, "k"), v("2"));
        let update = apply(&file, 3, change_record(StateStore::Sessions, "k", None, None)).unwrap();
        assert_eq!((update.store, update.key.as_str(), update.value), (StateStore::Sessions, "k", None));
        assert_eq!(value(&file, "k"), None);
        assert_eq!(stored(&file, StateStore::Retained, "k").map(|(v, o, _)| (v, o)), Some((Bytes::from("r"), 1)));
        assert_eq!(file.offsets().unwrap().get(&0), Some(&4), "a restart reads from offset 4");
        // A record that is no state change changes nothing.
        let junk = CoreRecord { key: Some(Bytes::from("k")), headers: vec![], value: Bytes::new(), timestamp_ms: 0 };
        assert!(change_of(5, &junk).is_none());
    }

    #[test]
    fn refresh_renews_only_the_record_it_copied() {
        let dir = tempfile::tempdir().unwrap();
        let file = DiskState::open(dir.path(), "rocketmq:test").unwrap();
        let v1 = Some(Bytes::from_static(b"v1"));
        let v2 = Some(Bytes::from_static(b"v2"));
        apply(&file, 10, at(change_record(StateStore::Sessions, "k", v1.clone(), None), 1_000));
        // A refresh of offset 10 renews the entry: same value, new record, no update to watchers.
        assert!(apply(&file, 11, at(change_record(StateStore::Sessions, "k", v1.clone(), Some(10)), 5_000)).is_none());
        assert_eq!(stored(&file, StateStore::Sessions, "k"), Some((Bytes::from("v1"), 11, 5_000)));
        // A newer write, then a late refresh that copied the old record: ignored.
        apply(&file, 12, at(change_record(StateStore::Sessions, "k", v2.clone(), None), 6_000));
        assert!(apply(&file, 13, at(change_record(StateStore::Sessions, "k", v1.clone(), Some(11)), 7_000)).is_none());
        assert_eq!(stored(&file, StateStore::Sessions, "k"), Some((Bytes::from("v2"), 12, 6_000)));
        // A refresh of a deleted key does not bring it back.
        apply(&file, 14, change_record(StateStore::Sessions, "k", None, None));
        apply(&file, 15, change_record(StateStore::Sessions, "k", v2, Some(12)));
        assert_eq!(value(&file, "k"), None);
    }
}
