//! Backlog and delay of sessions, for the metrics `lmq_backlog_*` and
//! `lmq_session_backlog_*` (SPEC §10): how many messages stored in the core service the
//! sessions subscribed to a parent topic have not acknowledged yet, and how old the oldest
//! of them is; the same for the K sessions with the largest backlog.
//!
//! Two sources, never both for one session:
//! - *connected here*: the [`LiveView`] each connection publishes in the registry (at most
//!   once a second while it is busy, once more a second after its last activity);
//! - *stored and offline* (`disconnected_at_ms` set): the sessions store. Every gateway sees the
//!   same store and reports these sessions, so in Prometheus the `offline` series of a parent
//!   topic are aggregated with `max`, the `connected` ones with `sum` (README, "Backlog").
//!   Stored sessions marked connected belong to the gateway they are connected to.
//!
//! Only positions in core topics the session subscribes to (non-shared filters: shared
//! subscriptions are not read back from the log) count. Backlog per partition = end offset −
//! the position acknowledged up to, less the offsets acknowledged above it; a connected session
//! that is not behind counts its unacknowledged deliveries plus what the router has not
//! routed yet. The count includes records of the parent topic that the session's filters do
//! not match (what a returning session reads back and filters).
//!
//! Work is done in *passes* of at most `backlog.max_sessions_per_round` sessions per round
//! (every `backlog.interval_secs`); a pass over more sessions spans several rounds and the
//! gauges change when it completes. End offsets are read once per partition per round,
//! record timestamps (delay) once per partition and offset per pass, at most
//! [`MAX_FETCHES_PER_PASS`]. This module reads; it never changes a session.

use bytes::Bytes;
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::persist::Stored;
use super::registry::Registry;
use super::state::SessionState;
use crate::backend::{SharedCoreService, StateStore, TopicPartition};
use crate::config::BacklogConfig;
use crate::metrics::{BacklogRow, Metrics, SessionBacklogRow};
use crate::router::mapping::TopicMap;
use crate::router::Router;

/// Record reads (for timestamps) per pass at most; delays of further partitions are not
/// computed in that pass.
pub const MAX_FETCHES_PER_PASS: usize = 1000;
/// Each read of the core service (end offset, one record) waits at most this long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition's read position of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// Everything from `committed` on is unread, except `acked` offsets acknowledged above it
    /// (a stored session, or a connected one reading back from the core service).
    Read { committed: u64, acked: u64 },
    /// A connected session the router delivers to directly (not lagging, nothing waiting in
    /// its queue): `unacked` deliveries from `committed` on, everything below `next` handled,
    /// and whatever the router has not routed yet.
    Attached { committed: u64, next: u64, unacked: u64 },
}

/// What the backlog computation needs of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionView {
    /// Subscription filters read back from the log (`$share/...` ones excluded).
    pub filters: Vec<String>,
    pub positions: Vec<(TopicPartition, Position)>,
}

impl SessionView {
    /// A connected session: `lagging` = partitions it reads back from the core service,
    /// `queue_empty` = no delivery waits in its queue from the router.
    pub fn live(state: &SessionState, lagging: &[TopicPartition], queue_empty: bool) -> SessionView {
        let positions = state
            .cursors
            .iter()
            .map(|(tp, c)| {
                let committed = c.committed();
                let p = if queue_empty && !lagging.contains(tp) {
                    Position::Attached { committed, next: c.next, unacked: c.pending.len() as u64 }
                } else {
                    Position::Read { committed, acked: c.acked.len() as u64 }
                };
                (tp.clone(), p)
            })
            .collect();
        SessionView { filters: own_filters(state.subscriptions.iter().map(|s| s.filter.as_str())), positions }
    }

    /// A stored session.
    pub fn stored(s: &Stored) -> SessionView {
        let positions = s
            .positions
            .iter()
            .map(|p| {
                let acked = p.acked.iter().filter(|o| **o >= p.committed).count() as u64;
                (TopicPartition::new(p.topic.as_str(), p.partition), Position::Read { committed: p.committed, acked })
            })
            .collect();
        SessionView { filters: own_filters(s.subscriptions.iter().map(|s| s.filter.as_str())), positions }
    }
}

fn own_filters<'a>(filters: impl Iterator<Item = &'a str>) -> Vec<String> {
    filters.filter(|f| !f.starts_with("$share/")).map(str::to_owned).collect()
}

/// The latest [`SessionView`] of a connected session, published by its connection.
#[derive(Debug, Default)]
pub struct LiveView(Mutex<Option<Arc<SessionView>>>);

impl LiveView {
    pub fn set(&self, view: SessionView) {
        *self.0.lock() = Some(Arc::new(view));
    }

    pub fn get(&self) -> Option<Arc<SessionView>> {
        self.0.lock().clone()
    }
}

/// Whether a session's positions count as connected here or as stored offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Connected = 0,
    Offline = 1,
}

/// Backlog of one partition for one session: messages, and the oldest unacknowledged offset.
fn partition_backlog(p: &Position, end: u64, routed: Option<u64>) -> (u64, Option<u64>) {
    match *p {
        Position::Read { committed, acked } => {
            let n = end.saturating_sub(committed).saturating_sub(acked);
            (n, (n > 0).then_some(committed))
        }
        Position::Attached { committed, next, unacked } => {
            let from = next.max(routed.unwrap_or(next));
            let unrouted = end.saturating_sub(from);
            let oldest = if unacked > 0 { Some(committed) } else { (unrouted > 0).then_some(from) };
            (unacked + unrouted, oldest)
        }
    }
}

/// Core topics a session's filters read: `None` = every one (first level `#` or `+`).
fn subscribed_core_topics(filters: &[String], topics: &TopicMap) -> Option<HashSet<Arc<str>>> {
    let mut out = HashSet::new();
    for f in filters {
        let first = crate::router::topic::parent(f);
        if first == "#" || first == "+" {
            return None;
        }
        if let Ok(t) = topics.resolve(first) {
            out.insert(t.name);
        }
    }
    Some(out)
}

/// One session with its backlog, for the top K.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ranked {
    backlog: u64,
    client_id: String,
    /// Partitions with a backlog and their oldest unacknowledged offset.
    oldest: Vec<(TopicPartition, u64)>,
}

/// What a pass has added up so far.
#[derive(Default)]
struct Totals {
    /// (core topic, kind) → messages.
    backlog: BTreeMap<(Arc<str>, Kind), u64>,
    /// (partition, kind) → oldest unacknowledged offset over all sessions.
    oldest: HashMap<(TopicPartition, Kind), u64>,
    /// The K largest backlogs (a min-heap).
    top: BinaryHeap<Reverse<Ranked>>,
    sessions: [u64; 2],
}

/// Stored sessions read from the sessions store at once.
const STORED_PAGE: usize = 1000;

/// A pass over every session: what is left to examine and what was added up.
struct Pass {
    live: Vec<(String, Arc<SessionView>)>,
    /// The current page of stored sessions (examined from its end).
    stored: Vec<(String, Bytes)>,
    /// Key to read the next page after; `None` once the store has been read to its end.
    next_page: Option<String>,
    connected: HashSet<String>,
    totals: Totals,
}

/// The backlog computation of one gateway.
pub struct Backlog {
    backend: SharedCoreService,
    registry: Arc<Registry>,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    config: BacklogConfig,
    /// Parent-topic series at most (declared parents plus `limits.max_core_topics`).
    max_parents: usize,
    pass: Option<Pass>,
    /// End offsets read this round.
    ends: HashMap<TopicPartition, Option<u64>>,
    /// Router positions read this round.
    routed: HashMap<TopicPartition, Option<u64>>,
}

impl Backlog {
    pub fn new(
        backend: SharedCoreService,
        registry: Arc<Registry>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        config: BacklogConfig,
        max_core_topics: usize,
    ) -> Backlog {
        let max_parents = router.topics().declared().count().saturating_add(max_core_topics);
        // Declared parent topics have their series (at zero) from the first scrape on.
        let zeros: Vec<BacklogRow> = router
            .topics()
            .declared()
            .filter(|(_, t)| !router.topics().is_reserved(&t.name))
            .flat_map(|(p, _)| {
                ["connected", "offline"].map(|sessions| BacklogRow {
                    parent_topic: p.to_owned(),
                    sessions,
                    messages: 0,
                    delay_secs: 0.0,
                })
            })
            .collect();
        metrics.backlog.set(&zeros, &[], [0, 0]);
        Backlog {
            backend,
            registry,
            router,
            metrics,
            config,
            max_parents,
            pass: None,
            ends: HashMap::new(),
            routed: HashMap::new(),
        }
    }

    /// One round: examine up to `max_sessions_per_round` sessions; when that completes a
    /// pass, publish the gauges. Returns whether it did.
    pub async fn round(&mut self) -> bool {
        self.ends.clear();
        self.routed.clear();
        let mut pass = match self.pass.take() {
            Some(p) => p,
            None => match self.start_pass().await {
                Some(p) => p,
                None => return false,
            },
        };
        let mut budget = self.config.max_sessions_per_round.max(1);
        while budget > 0 {
            if pass.stored.is_empty() {
                if let Some(after) = pass.next_page.take() {
                    match self.stored_page(Some(after)).await {
                        Some((page, next)) => (pass.stored, pass.next_page) = (page, next),
                        // The store is not readable now: the pass starts over next time.
                        None => return false,
                    }
                }
            }
            if let Some((client_id, view)) = pass.live.pop() {
                self.add(&mut pass.totals, Kind::Connected, client_id, &view).await;
            } else if let Some((client_id, value)) = pass.stored.pop() {
                // Connected here: counted live.
                if pass.connected.contains(&client_id) {
                    continue;
                }
                // Connected to another gateway (counted there), or unreadable: decoded, not counted.
                if let Some(stored) = Stored::decode(&value).filter(|s| s.disconnected_at_ms.is_some()) {
                    self.add(&mut pass.totals, Kind::Offline, client_id, &SessionView::stored(&stored)).await;
                }
            } else {
                break;
            }
            budget -= 1;
        }
        if !pass.live.is_empty() || !pass.stored.is_empty() || pass.next_page.is_some() {
            self.pass = Some(pass);
            return false;
        }
        self.publish(pass.totals).await;
        true
    }

    async fn start_pass(&self) -> Option<Pass> {
        let live: Vec<(String, Arc<SessionView>)> = self.registry.live_views();
        let connected = self.registry.client_ids().into_iter().collect();
        let (stored, next_page) = self.stored_page(None).await?;
        Some(Pass { live, stored, next_page, connected, totals: Totals::default() })
    }

    /// A page of stored sessions after `after`, reversed (popped from the end), and where the
    /// next one starts (`None`: this was the last).
    async fn stored_page(&self, after: Option<String>) -> Option<(Vec<(String, Bytes)>, Option<String>)> {
        let read = self.backend.scan_state(StateStore::Sessions, after, STORED_PAGE);
        let mut page = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "backlog: sessions store not readable");
                return None;
            }
            Err(_) => {
                tracing::debug!("backlog: sessions store not readable in time");
                return None;
            }
        };
        let next = (page.len() == STORED_PAGE).then(|| page.last().map(|(k, _)| k.clone())).flatten();
        page.reverse();
        Some((page, next))
    }

    async fn end(&mut self, tp: &TopicPartition) -> Option<u64> {
        if let Some(e) = self.ends.get(tp) {
            return *e;
        }
        let e = match tokio::time::timeout(READ_TIMEOUT, self.backend.end_offset(tp)).await {
            Ok(Ok(e)) => Some(e),
            _ => None,
        };
        self.ends.insert(tp.clone(), e);
        e
    }

    fn routed(&mut self, tp: &TopicPartition) -> Option<u64> {
        if let Some(r) = self.routed.get(tp) {
            return *r;
        }
        let r = self.router.positions_of(std::slice::from_ref(tp)).first().map(|(_, p)| *p);
        self.routed.insert(tp.clone(), r);
        r
    }

    async fn add(&mut self, totals: &mut Totals, kind: Kind, client_id: String, view: &SessionView) {
        let router = self.router.clone();
        let topics = router.topics();
        let subscribed = subscribed_core_topics(&view.filters, topics);
        let mut total = 0u64;
        let mut oldest = Vec::new();
        let mut counted = false;
        for (tp, p) in &view.positions {
            let reads = match &subscribed {
                Some(set) => set.contains(&tp.topic),
                None => !topics.is_reserved(&tp.topic),
            };
            if !reads {
                continue;
            }
            let Some(end) = self.end(tp).await else { continue };
            let routed = match p {
                Position::Attached { .. } => self.routed(tp),
                Position::Read { .. } => None,
            };
            let (n, old) = partition_backlog(p, end, routed);
            counted = true;
            *totals.backlog.entry((tp.topic.clone(), kind)).or_insert(0) += n;
            if let Some(o) = old {
                let e = totals.oldest.entry((tp.clone(), kind)).or_insert(o);
                *e = (*e).min(o);
                oldest.push((tp.clone(), o));
            }
            total += n;
        }
        if counted {
            totals.sessions[kind as usize] += 1;
        }
        let k = self.config.top_sessions;
        if total == 0 || k == 0 {
            return;
        }
        let smallest = totals.top.peek().map(|Reverse(r)| r.backlog);
        if totals.top.len() < k || smallest.is_some_and(|s| total > s) {
            totals.top.push(Reverse(Ranked { backlog: total, client_id, oldest }));
            if totals.top.len() > k {
                totals.top.pop();
            }
        }
    }

    /// Timestamps (ms) of the records at the given positions, read once each.
    async fn timestamps(
        &self,
        wanted: impl IntoIterator<Item = (TopicPartition, u64)>,
    ) -> HashMap<(TopicPartition, u64), i64> {
        let mut out = HashMap::new();
        for (tp, offset) in wanted {
            if out.len() >= MAX_FETCHES_PER_PASS {
                break;
            }
            if out.contains_key(&(tp.clone(), offset)) {
                continue;
            }
            if let Ok(Ok(f)) = tokio::time::timeout(READ_TIMEOUT, self.backend.fetch(&tp, offset, 1)).await {
                if let Some(r) = f.records.first() {
                    out.insert((tp, offset), r.record.timestamp_ms);
                }
            }
        }
        out
    }

    async fn publish(&mut self, totals: Totals) {
        let now = crate::now_ms();
        let age = |ts: Option<i64>| ts.map_or(0.0, |t| (now.saturating_sub(t)).max(0) as f64 / 1000.0);
        let top: Vec<Ranked> = totals.top.into_sorted_vec().into_iter().map(|Reverse(r)| r).collect();
        let wanted = totals
            .oldest
            .iter()
            .map(|((tp, _), o)| (tp.clone(), *o))
            .chain(top.iter().flat_map(|r| r.oldest.iter().cloned()))
            .collect::<Vec<_>>();
        let ts = self.timestamps(wanted).await;

        // Delay per (core topic, kind): the oldest record over its partitions.
        let mut oldest_ts: HashMap<(Arc<str>, Kind), i64> = HashMap::new();
        for ((tp, kind), o) in &totals.oldest {
            if let Some(t) = ts.get(&(tp.clone(), *o)) {
                let e = oldest_ts.entry((tp.topic.clone(), *kind)).or_insert(*t);
                *e = (*e).min(*t);
            }
        }
        // Every core topic with a session position, every declared and every tailed one.
        let router = self.router.clone();
        let topics = router.topics();
        let mut cores: Vec<(Arc<str>, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for (core, _) in totals.backlog.keys() {
            if seen.insert(core.clone()) {
                let sum = [Kind::Connected, Kind::Offline]
                    .iter()
                    .map(|k| totals.backlog.get(&(core.clone(), *k)).copied().unwrap_or(0))
                    .sum();
                cores.push((core.clone(), sum));
            }
        }
        let known =
            topics.declared().map(|(_, t)| t.name.clone()).chain(router.assigned_topics().into_iter().map(|t| t.name));
        for core in known {
            if !topics.is_reserved(&core) && seen.insert(core.clone()) {
                cores.push((core, 0));
            }
        }
        // Bounded series: the largest backlogs first.
        cores.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        cores.truncate(self.max_parents);
        let parent_of: HashMap<&str, &str> = topics.declared().map(|(p, t)| (&*t.name, p)).collect();
        let mut rows = Vec::with_capacity(cores.len() * 2);
        for (core, _) in &cores {
            let parent = parent_of.get(&**core).copied().unwrap_or(core).to_owned();
            for kind in [Kind::Connected, Kind::Offline] {
                rows.push(BacklogRow {
                    parent_topic: parent.clone(),
                    sessions: match kind {
                        Kind::Connected => "connected",
                        Kind::Offline => "offline",
                    },
                    messages: totals.backlog.get(&(core.clone(), kind)).copied().unwrap_or(0),
                    delay_secs: age(oldest_ts.get(&(core.clone(), kind)).copied()),
                });
            }
        }
        let sessions: Vec<SessionBacklogRow> = top
            .iter()
            .map(|r| {
                let oldest = r.oldest.iter().filter_map(|(tp, o)| ts.get(&(tp.clone(), *o)).copied()).min();
                SessionBacklogRow { client_id: r.client_id.clone(), messages: r.backlog, delay_secs: age(oldest) }
            })
            .collect();
        self.metrics.backlog.set(&rows, &sessions, totals.sessions);
    }
}

/// Compute every `config.interval_secs` until the token is cancelled.
pub async fn run(mut backlog: Backlog, stop: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs(backlog.config.interval_secs.max(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = backlog.round() => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_position_counts_what_follows_the_committed_offset_less_acknowledged() {
        assert_eq!(partition_backlog(&Position::Read { committed: 10, acked: 0 }, 15, None), (5, Some(10)));
        assert_eq!(partition_backlog(&Position::Read { committed: 10, acked: 2 }, 15, None), (3, Some(10)));
        assert_eq!(partition_backlog(&Position::Read { committed: 15, acked: 0 }, 15, None), (0, None));
        // A log shorter than the position (lost unsynced tail) is no backlog, not an overflow.
        assert_eq!(partition_backlog(&Position::Read { committed: 20, acked: 3 }, 15, None), (0, None));
    }

    #[test]
    fn attached_position_counts_unacked_deliveries_and_what_is_not_routed_yet() {
        // Records below the routing position that did not match are no backlog.
        let idle = Position::Attached { committed: 3, next: 3, unacked: 0 };
        assert_eq!(partition_backlog(&idle, 100, Some(100)), (0, None));
        assert_eq!(partition_backlog(&idle, 104, Some(100)), (4, Some(100)));
        let busy = Position::Attached { committed: 50, next: 60, unacked: 2 };
        assert_eq!(partition_backlog(&busy, 100, Some(100)), (2, Some(50)));
        assert_eq!(partition_backlog(&busy, 100, None), (42, Some(50)));
    }

    #[test]
    fn shared_subscriptions_are_not_the_sessions_own() {
        assert_eq!(own_filters(["a/#", "$share/g/b/#", "c"].into_iter()), vec!["a/#".to_string(), "c".to_string()]);
    }
}
