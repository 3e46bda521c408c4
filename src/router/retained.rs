//! The router's index of retained messages.
//!
//! The index holds every topic of the core service's retained store with what matching,
//! bounding and expiring its message need (size, expiry), not the message: a SUBSCRIBE reads
//! the messages its filters match from the store (`Router::retained_messages`). The memory of
//! the index grows with the number of retained topics, not with their payloads.
//!
//! At start, [`load`] pages through the store while it follows the store's changes, so the
//! gateway accepts connections without waiting for the whole store; SUBSCRIBEs wait for
//! [`RetainedIndex::wait_loaded`]. A page read while changes arrive is older than those
//! changes for the keys they touched: its entries for them are skipped.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

use super::mapping::Message;
use super::{topic, Router};
use crate::backend::{StateStore, StateUpdate};

/// Bytes of retained messages held in memory at most (see [`Entry::held`]).
const MAX_HELD_BYTES: usize = 8 * 1024 * 1024;

/// Entries read per page at start.
const PAGE: usize = 1000;

/// Changes remembered while one page is read: beyond it the page is read again.
const MAX_TOUCHED: usize = 100_000;

/// What the index keeps of a retained message: enough to match, bound and expire it.
struct Entry {
    /// Topic and payload bytes (what `limits.max_retained_bytes` counts).
    size: usize,
    /// Epoch ms its message expiry interval ends, if it has one.
    expires_at: Option<i64>,
    /// The message, for one this gateway stored, until the core service's update stream
    /// brings it (then it is read from the store like the others).
    held: Option<Arc<Message>>,
}

/// A retained topic a filter matched, and its message when the index holds it.
pub type RetainedMatch = (String, Option<Arc<Message>>);

#[derive(Default)]
struct Entries {
    by_topic: BTreeMap<String, Entry>,
    /// Topics + payloads.
    bytes: usize,
    /// Size of the entries whose message is held.
    held_bytes: usize,
}

pub struct RetainedIndex {
    entries: Mutex<Entries>,
    loaded: watch::Sender<bool>,
}

impl RetainedIndex {
    pub fn new() -> RetainedIndex {
        RetainedIndex { entries: Mutex::new(Entries::default()), loaded: watch::Sender::new(false) }
    }

    /// The first `limit` unexpired topics matching a filter (not `$share`), in topic order,
    /// with the message where the index holds it, and how many matched in all. Walks the
    /// topics that start with the filter's literal levels (all of them for a filter that
    /// starts with a wildcard).
    pub fn matching(&self, filter: &str, limit: usize, now_ms: i64) -> (Vec<RetainedMatch>, usize) {
        let prefix = literal_prefix(filter);
        let e = self.entries.lock();
        let mut matched = 0;
        let mut first = Vec::with_capacity(limit.min(1024));
        for (topic, entry) in e.by_topic.range::<str, _>((Bound::Included(prefix), Bound::Unbounded)) {
            if !topic.starts_with(prefix) {
                break;
            }
            if entry.expires_at.is_some_and(|t| now_ms >= t) || !topic::matches(filter, topic) {
                continue;
            }
            matched += 1;
            if first.len() < limit {
                first.push((topic.clone(), entry.held.clone()));
            }
        }
        (first, matched)
    }

    pub fn count(&self) -> usize {
        self.entries.lock().by_topic.len()
    }

    /// Whether a retained message of `payload_len` bytes on `topic` fits within `max_count`
    /// messages and `max_bytes` bytes (replacing the topic's current one, if any).
    pub fn room(&self, topic: &str, payload_len: usize, max_count: usize, max_bytes: usize) -> bool {
        let e = self.entries.lock();
        let old = e.by_topic.get(topic).map(|e| e.size);
        let bytes = e.bytes - old.unwrap_or(0) + topic.len() + payload_len;
        (old.is_some() || e.by_topic.len() < max_count) && bytes <= max_bytes
    }

    /// Index (or, with `None`, remove) a retained topic; `hold`: keep the message itself too.
    pub fn index(&self, topic: &str, message: Option<Arc<Message>>, hold: bool) {
        let entry = message.map(|m| Entry {
            size: topic.len() + m.payload.len(),
            expires_at: m.message_expiry_interval.map(|secs| m.timestamp_ms.saturating_add(i64::from(secs) * 1000)),
            held: hold.then_some(m),
        });
        let mut e = self.entries.lock();
        let added = entry.as_ref().map_or(0, |e| e.size);
        let held = entry.as_ref().and_then(|e| e.held.as_ref()).map_or(0, |_| added);
        let removed = match entry {
            Some(entry) => e.by_topic.insert(topic.to_string(), entry),
            None => e.by_topic.remove(topic),
        };
        e.bytes = e.bytes + added - removed.as_ref().map_or(0, |e| e.size);
        let unheld = removed.as_ref().and_then(|e| e.held.as_ref().map(|_| e.size)).unwrap_or(0);
        e.held_bytes = (e.held_bytes + held).saturating_sub(unheld);
        // An update that overtook this gateway's own write leaves its message held: bounded,
        // then every held message is let go (they are read from the store instead).
        if e.held_bytes > MAX_HELD_BYTES {
            e.by_topic.values_mut().for_each(|e| e.held = None);
            e.held_bytes = 0;
        }
    }

    /// Whether the index holds the whole store (as of some moment after start).
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Wait until the index is loaded, at most `limit`; false if it is not by then.
    pub async fn wait_loaded(&self, limit: Duration) -> bool {
        let mut rx = self.loaded.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|l| *l)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Default for RetainedIndex {
    fn default() -> Self {
        RetainedIndex::new()
    }
}

/// Load the index: page through the retained store while applying its changes (`updates`,
/// from `CoreService::follow_state`, registered before the first page), then keep applying
/// them for as long as the router lives.
/// Holds the router and its core service only while it reads a page: a stopped gateway's
/// core service is not kept alive (nor its local state copy locked) by this task.
pub(super) async fn load(router: Weak<Router>, mut updates: mpsc::Receiver<StateUpdate>) {
    let mut after: Option<String> = None;
    let mut touched: HashSet<String> = HashSet::new();
    loop {
        touched.clear();
        let mut stale = false;
        let Some(scan) = router.upgrade().map(|r| r.backend.scan_state(StateStore::Retained, after.clone(), PAGE))
        else {
            return;
        };
        tokio::pin!(scan);
        let page = loop {
            tokio::select! {
                page = &mut scan => break page,
                u = updates.recv() => {
                    let Some(u) = u else { return };
                    let Some(r) = router.upgrade() else { return };
                    if touched.len() < MAX_TOUCHED {
                        touched.insert(u.key.clone());
                    } else {
                        stale = true;
                    }
                    r.apply_retained_value(&u.key, u.value);
                }
            }
        };
        let page = match page {
            Ok(page) if !stale => page,
            Ok(_) => continue,
            Err(e) => {
                // The store is not readable yet (the core service is catching up or away):
                // keep applying changes and try again.
                tracing::warn!(error = %e, "retained store not readable yet; retrying");
                let pause = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        u = updates.recv() => {
                            let (Some(u), Some(r)) = (u, router.upgrade()) else { return };
                            r.apply_retained_value(&u.key, u.value);
                        }
                    }
                }
                continue;
            }
        };
        let Some(r) = router.upgrade() else { return };
        let full = page.len() == PAGE;
        let last = page.last().map(|(k, _)| k.clone());
        for (key, value) in page {
            if !touched.contains(&key) {
                r.apply_retained_value(&key, Some(value));
            }
        }
        match last {
            Some(k) if full => after = Some(k),
            _ => break,
        }
    }
    if let Some(r) = router.upgrade() {
        r.retained.loaded.send_replace(true);
        tracing::info!(topics = r.retained.count(), "retained index loaded");
    }
    while let Some(u) = updates.recv().await {
        let Some(r) = router.upgrade() else { return };
        r.apply_retained_value(&u.key, u.value);
    }
}

/// The part of a filter before its first wildcard level, without the separator: every topic
/// it matches starts with it (`a/b/#` matches `a/b` itself).
fn literal_prefix(filter: &str) -> &str {
    let mut end = 0;
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            break;
        }
        end += level.len() + 1;
    }
    filter[..end.min(filter.len())].trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every topic a filter matches starts with its literal prefix, so the index is walked
    /// from there only.
    #[test]
    fn a_filter_matches_only_topics_under_its_literal_prefix() {
        assert_eq!(literal_prefix("a/b/#"), "a/b");
        assert_eq!(literal_prefix("a/b"), "a/b");
        assert_eq!(literal_prefix("a/+/c"), "a");
        assert_eq!(literal_prefix("+/x"), "");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("a//#"), "a");
        let topics = ["a", "a/b", "a/b/c", "a/bc", "ab/x", "b/x", "$SYS/a", "/x"];
        for filter in ["a/b/#", "a/+", "a/#", "+/x", "#", "+/+", "/+", "a/b", "$SYS/#", "+"] {
            for t in topics {
                if topic::matches(filter, t) {
                    assert!(t.starts_with(literal_prefix(filter)), "{filter} matches {t}");
                }
            }
        }
    }
}
