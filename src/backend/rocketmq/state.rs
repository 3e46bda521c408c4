//! Keyed state (sessions, retained messages, credentials, revoked tokens) on a RocketMQ topic.
//!
//! Classic RocketMQ brokers have no compacted topics, so the state topic (one queue) is a log
//! of changes: tag = store, key = state key, a `lmqStateOp` of `put` or `delete`. Every
//! gateway follows it from the oldest retained message into an in-memory view, the same view
//! on every gateway because all apply the same log in the same order.
//!
//! - `put_state` sends a change and waits until this gateway's view has applied it.
//! - `get_state` asks the broker for the queue's end and waits until the view has applied
//!   everything before it: a change acknowledged on any gateway is seen (read-your-writes
//!   across gateways), at the cost of one round trip.
//! - `watch_state` = snapshot + every later change, taken atomically with the applier.
//! - Retention: the broker deletes whole commit-log files after `fileReservedTime`. A live
//!   entry whose record is older than `state_refresh_hours` is written again as a *refresh*
//!   naming the offset it copies; a refresh applies only while the entry still comes from that
//!   offset, so a refresh racing a newer write (from any gateway) is ignored everywhere.
//!   Deletions need no refresh: once the older records are gone the key is gone too.
//!
//! Limits: start-up replays the whole retained state topic (memory ∝ live state, time ∝ state
//! traffic within the retention); a gateway that is stopped longer than the retention does
//! not matter (it replays from what is retained), but every entry must be refreshed by *some*
//! running gateway within the retention.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::client::{self, Client};
use super::record::from_message;
use crate::backend::{BackendError, CoreRecord, Result, StateStore, StateUpdate, TopicPartition};
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Clone)]
struct Entry {
    value: Bytes,
    /// Offset of the record this value comes from.
    offset: u64,
    /// Time of that record.
    written_ms: i64,
}

#[derive(Default)]
struct View {
    stores: HashMap<StateStore, HashMap<String, Entry>>,
    watchers: Vec<(StateStore, mpsc::Sender<StateUpdate>)>,
}

impl View {
    /// Apply the change stored at `offset`; returns the update and the watchers to tell, or
    /// `None` when nothing visible changed (a refresh, or a record that is no change).
    fn apply(&mut self, offset: u64, rec: CoreRecord) -> Option<(StateUpdate, Vec<mpsc::Sender<StateUpdate>>)> {
        let store = rec.header(STORE).and_then(|s| store_of(s))?;
        let key = rec.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()).map(str::to_owned)?;
        let delete = rec.header(OP).is_some_and(|op| op.as_ref() == b"delete");
        let refresh_of = rec.header(REFRESH_OF).and_then(|o| std::str::from_utf8(o).ok()?.parse::<u64>().ok());
        let entries = self.stores.entry(store).or_default();
        if let Some(of) = refresh_of {
            // A refresh changes no value: it only renews the record the entry comes from, and
            // only while the entry still comes from the record it copied.
            if let Some(e) = entries.get_mut(&key).filter(|e| e.offset == of) {
                e.offset = offset;
                e.written_ms = rec.timestamp_ms;
            }
            return None;
        }
        if delete {
            entries.remove(&key);
        } else {
            entries.insert(key.clone(), Entry { value: rec.value.clone(), offset, written_ms: rec.timestamp_ms });
        }
        self.watchers.retain(|(_, tx)| !tx.is_closed());
        let senders = self.watchers.iter().filter(|(s, _)| *s == store).map(|(_, tx)| tx.clone()).collect();
        Some((StateUpdate { store, key, value: if delete { None } else { Some(rec.value) } }, senders))
    }

    fn stale(&self, limit_ms: i64) -> Vec<(StateStore, String, Bytes, u64)> {
        self.stores
            .iter()
            .flat_map(|(store, m)| {
                m.iter()
                    .filter(|(_, e)| e.written_ms < limit_ms)
                    .map(|(k, e)| (*store, k.clone(), e.value.clone(), e.offset))
            })
            .collect()
    }
}

/// The in-memory view of the state topic and the task that keeps it current.
pub struct StateView {
    client: Arc<Client>,
    tp: TopicPartition,
    view: Mutex<View>,
    /// Next offset to apply (everything below is in the view).
    applied: watch::Sender<u64>,
    /// Cleared while the state topic cannot be read (the broker is away), set again on success.
    healthy: Arc<AtomicBool>,
}

impl StateView {
    pub fn new(client: Arc<Client>, topic: &str, healthy: Arc<AtomicBool>) -> Arc<StateView> {
        Arc::new(StateView {
            client,
            tp: TopicPartition::new(topic, 0),
            view: Mutex::new(View::default()),
            applied: watch::channel(0).0,
            healthy,
        })
    }

    /// Follow the state topic until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let hold = Duration::from_millis(self.client.config.poll_suspend_ms.max(1));
        let mut next = 0u64;
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
                r = self.client.pull(&mq, next, client::PULL_MAX, Some(hold)) => r,
                _ = stop.cancelled() => return,
            };
            self.healthy.store(pulled.is_ok(), Ordering::Release);
            match pulled {
                Ok(r) => match r.pull_status() {
                    PullStatus::Found => {
                        for m in r.msg_found_list().unwrap_or_default() {
                            let Ok(offset) = u64::try_from(m.queue_offset()) else { continue };
                            if offset < next {
                                continue;
                            }
                            self.apply(offset, from_message(m)).await;
                            next = offset + 1;
                        }
                        next = next.max(r.next_begin_offset());
                        self.applied.send_replace(next);
                    }
                    PullStatus::NoNewMsg | PullStatus::NoMatchedMsg => {
                        next = next.max(r.next_begin_offset());
                        self.applied.send_replace(next);
                    }
                    PullStatus::OffsetIllegal => {
                        if next < r.min_offset() {
                            next = r.min_offset();
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "state topic pull failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn apply(&self, offset: u64, rec: CoreRecord) {
        let Some((update, senders)) = self.view.lock().apply(offset, rec) else { return };
        for tx in senders {
            // Bounded: a slow watcher delays the view, it never loses a change.
            let _ = tx.send(update.clone()).await;
        }
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

    /// Wait until the view holds everything the broker has stored so far.
    pub async fn catch_up(&self, timeout: Duration) -> Result<()> {
        let mq = self.client.queue(&self.tp).await?;
        let end = self.client.max_offset(&mq).await?;
        self.wait_applied(end, timeout).await
    }

    pub fn get(&self, store: StateStore, key: &str) -> Option<Bytes> {
        self.view.lock().stores.get(&store).and_then(|m| m.get(key)).map(|e| e.value.clone())
    }

    /// A page of entries in key order (`CoreService::scan_state`).
    pub fn scan(&self, store: StateStore, after: Option<&str>, limit: usize) -> Vec<(String, Bytes)> {
        let view = self.view.lock();
        match view.stores.get(&store) {
            Some(m) => crate::backend::scan_entries(m.iter().map(|(k, e)| (k, &e.value)), after, limit),
            None => Vec::new(),
        }
    }

    pub fn watch(&self, store: StateStore, tx: mpsc::Sender<StateUpdate>) -> Vec<(String, Bytes)> {
        let mut view = self.view.lock();
        let snapshot = view
            .stores
            .get(&store)
            .map(|m| m.iter().map(|(k, e)| (k.clone(), e.value.clone())).collect())
            .unwrap_or_default();
        view.watchers.push((store, tx));
        snapshot
    }

    /// Entries whose record is older than `age_ms`: (store, key, value, offset).
    pub fn stale(&self, age_ms: i64) -> Vec<(StateStore, String, Bytes, u64)> {
        self.view.lock().stale(now_ms().saturating_sub(age_ms))
    }
}

/// Period of the refresh check.
pub fn refresh_period() -> Duration {
    REFRESH_PERIOD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rec: CoreRecord, t: i64) -> CoreRecord {
        CoreRecord { timestamp_ms: t, ..rec }
    }

    fn value(view: &View, key: &str) -> Option<Bytes> {
        view.stores.get(&StateStore::Sessions).and_then(|m| m.get(key)).map(|e| e.value.clone())
    }

    #[test]
    fn puts_deletes_and_separate_stores() {
        let mut view = View::default();
        let v = |s: &'static str| Some(Bytes::from_static(s.as_bytes()));
        view.apply(0, change_record(StateStore::Sessions, "k", v("1"), None));
        view.apply(1, change_record(StateStore::Retained, "k", v("r"), None));
        view.apply(2, change_record(StateStore::Sessions, "k", v("2"), None));
        assert_eq!(value(&view, "k"), v("2"));
        let (update, _) = view.apply(3, change_record(StateStore::Sessions, "k", None, None)).unwrap();
        assert_eq!((update.key.as_str(), update.value), ("k", None));
        assert_eq!(value(&view, "k"), None);
        assert!(view.stores[&StateStore::Retained].contains_key("k"));
    }

    #[test]
    fn refresh_renews_only_the_record_it_copied() {
        let mut view = View::default();
        let v1 = Some(Bytes::from_static(b"v1"));
        let v2 = Some(Bytes::from_static(b"v2"));
        view.apply(10, at(change_record(StateStore::Sessions, "k", v1.clone(), None), 1_000));
        assert_eq!(view.stale(2_000).len(), 1, "old entry is due for a refresh");
        // A refresh of offset 10 renews the entry: same value, new record, no update to watchers.
        assert!(view.apply(11, at(change_record(StateStore::Sessions, "k", v1.clone(), Some(10)), 5_000)).is_none());
        assert_eq!(value(&view, "k"), v1);
        assert!(view.stale(2_000).is_empty(), "renewed");
        // A newer write, then a late refresh that copied the old record: ignored.
        view.apply(12, at(change_record(StateStore::Sessions, "k", v2.clone(), None), 6_000));
        assert!(view.apply(13, at(change_record(StateStore::Sessions, "k", v1.clone(), Some(11)), 7_000)).is_none());
        assert_eq!(value(&view, "k"), v2);
        // A refresh of a deleted key does not bring it back.
        view.apply(14, change_record(StateStore::Sessions, "k", None, None));
        view.apply(15, change_record(StateStore::Sessions, "k", v2, Some(12)));
        assert_eq!(value(&view, "k"), None);
    }
}
