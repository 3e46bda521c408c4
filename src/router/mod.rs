//! Routing records from the core service to the sessions of this gateway.
//!
//! Records reach the router in one of two ways, both ending in [`Router::route`]:
//! - **pushed** ([`LiveSink`]): a core service that can push (the embedded log) hands each
//!   batch to the router in the task that made it visible — the partition's writer — so a
//!   delivery waits for no other task;
//! - **tailed**: for the others (Kafka, RocketMQ) the dispatcher task owns the core service's
//!   live [`Tail`] and routes what each poll returns.
//!
//! For every record the router builds the MQTT [`Message`] once, finds the matching local
//! sessions in the subscription [`trie`], and offers the shared `Arc`s to each session's
//! bounded queue with `try_send` — it never waits for a session. Each partition's routing
//! position lives under the router's lock; a record below it was routed already and is
//! skipped, so a batch pushed twice is routed once. When a queue is full, a QoS 0 delivery is dropped and counted; for QoS 1/2
//! the session is marked *lagging* on that partition: the router skips it there, and the
//! session reads the missed records back from the core service itself, then re-attaches
//! (see `session::catchup`). The log is the buffer; a slow subscriber blocks no one.
//!
//! Data flows one way: backend → router → session. The router never writes to the backend
//! except to create topics.

mod groups;
pub mod mapping;
pub mod queue;
// The reserved namespace lives in `config` (its names are configuration); re-exported here for
// the `router::reserved` paths.
pub use crate::config::reserved;
pub mod retained;
pub mod topic;
pub mod trie;

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::{LiveSink, Record, SharedCoreService, StateStore, StateUpdate, Tail, TopicPartition};
use crate::protocol::QoS;
use crate::trace::Kind;
use mapping::{CoreTopic, Message, TopicMap};
pub use retained::RetainedMatch;
use trie::{PlainMatch, Trie};

/// One partition's recent routed records with their messages, oldest first.
type Ring = VecDeque<(Arc<Record>, Arc<Message>)>;

/// Recent routed records per partition, for re-attaching sessions: bounded in records and
/// bytes over all partitions together, the oldest (in routing order, whatever its
/// partition) evicted first. Each partition's ring holds the messages it routed from its
/// front offset on, without gaps; a record too large to keep empties its partition's ring.
struct ReplayRings {
    rings: HashMap<TopicPartition, Ring>,
    /// Every kept record in routing order (plus records already dropped by a ring clear).
    order: VecDeque<Arc<Record>>,
    bytes: usize,
    max_bytes: usize,
}

impl ReplayRings {
    fn new(max_bytes: usize) -> ReplayRings {
        ReplayRings { rings: HashMap::new(), order: VecDeque::new(), bytes: 0, max_bytes }
    }

    fn push(&mut self, record: &Arc<Record>, message: &Arc<Message>) {
        let size = record.record.memory_size();
        if size > self.max_bytes / 4 {
            // Kept, it would evict most of the others: the partition's ring restarts after it.
            if let Some(ring) = self.rings.remove(&record.tp) {
                self.bytes -= ring.iter().map(|(r, _)| r.record.memory_size()).sum::<usize>();
            }
            return;
        }
        while !self.order.is_empty() && (self.order.len() >= REPLAY_RECORDS || self.bytes + size > self.max_bytes) {
            self.evict_oldest();
        }
        self.rings.entry(record.tp.clone()).or_default().push_back((record.clone(), message.clone()));
        self.order.push_back(record.clone());
        self.bytes += size;
    }

    fn evict_oldest(&mut self) {
        let Some(oldest) = self.order.pop_front() else { return };
        let Some(ring) = self.rings.get_mut(&oldest.tp) else { return };
        if ring.front().is_some_and(|(r, _)| Arc::ptr_eq(r, &oldest)) {
            ring.pop_front();
            self.bytes -= oldest.record.memory_size();
            if ring.is_empty() {
                self.rings.remove(&oldest.tp);
            }
        }
    }

    fn get(&self, tp: &TopicPartition) -> Option<&Ring> {
        self.rings.get(tp)
    }
}

/// Identifies one connected session in the router (unique per process).
pub type SessionId = u64;

/// Records the router keeps (all partitions together) so that a session re-attaching
/// slightly behind can be served without another read from the core service; their bytes
/// are bounded by `limits.max_replay_bytes`.
const REPLAY_RECORDS: usize = 65_536;

/// Something for a session to deliver.
#[derive(Debug)]
///
/// Kept to two pointers: every connection's queue holds blocks of these.
pub enum Delivery {
    /// A record that matched one of the session's plain subscriptions (or is P2P for it).
    Live(Arc<Record>, Arc<Message>),
    /// A record routed to the session as a member of a share group: the `$share/...`
    /// subscription it came through.
    Shared(Box<(Arc<Record>, Arc<Message>, Arc<str>)>),
    /// Records of one partition handed over at re-attach time (unfiltered: the session
    /// matches them against its own subscriptions).
    Replay(Box<Vec<(Arc<Record>, Arc<Message>)>>),
}

/// The router's handle on one connected session.
pub struct SessionSlot {
    pub id: SessionId,
    pub client_id: Arc<str>,
    queue: queue::DeliveryQueue,
    /// Partitions the router skips for this session → first offset it did not deliver.
    lagging: Mutex<HashMap<TopicPartition, u64>>,
    any_lagging: AtomicBool,
    /// Woken when a partition starts lagging.
    pub lag_notify: Notify,
}

impl SessionSlot {
    fn new(id: SessionId, client_id: Arc<str>, capacity: usize) -> SessionSlot {
        SessionSlot {
            id,
            client_id,
            queue: queue::DeliveryQueue::new(capacity),
            lagging: Mutex::new(HashMap::new()),
            any_lagging: AtomicBool::new(false),
            lag_notify: Notify::new(),
        }
    }

    /// Partitions on which this session must read back from the core service, with the
    /// first offset to read. Does not clear them.
    pub fn lagging(&self) -> Vec<(TopicPartition, u64)> {
        self.lagging.lock().iter().map(|(tp, o)| (tp.clone(), *o)).collect()
    }

    /// Mark a partition lagging from `offset` (e.g. a restored session catching up).
    pub fn mark_lagging(&self, tp: TopicPartition, offset: u64) {
        let mut l = self.lagging.lock();
        let e = l.entry(tp).or_insert(offset);
        *e = (*e).min(offset);
        self.any_lagging.store(true, Ordering::Release);
        drop(l);
        self.lag_notify.notify_one();
    }

    fn is_lagging(&self, tp: &TopicPartition) -> bool {
        self.any_lagging.load(Ordering::Acquire) && self.lagging.lock().contains_key(tp)
    }

    fn clear_lagging(&self, tp: &TopicPartition) {
        let mut l = self.lagging.lock();
        l.remove(tp);
        self.any_lagging.store(!l.is_empty(), Ordering::Release);
    }
}

/// Outcome of [`Router::reattach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reattach {
    /// Live delivery resumed (records the session had not read were handed over as a replay).
    Attached,
    /// Routing has moved on too far; read on from the given offset and try again.
    Behind(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("parent topic `{0}` is not declared")]
    UndeclaredParent(String),
    /// The topic is in the reserved namespace (SPEC §8): never read or written for MQTT clients.
    #[error("topic `{0}` is reserved")]
    Reserved(String),
    /// `limits.max_core_topics` core topics for `*` parents are in use here already.
    #[error("no room for core topic `{0}`: limits.max_core_topics reached")]
    TopicLimit(String),
    #[error("core service: {0}")]
    Backend(#[from] crate::backend::BackendError),
    #[error("router stopped")]
    Stopped,
}

enum Command {
    /// Tail `topic` from `ends` (one per partition, read by the caller).
    Assign { topic: CoreTopic, ends: Vec<u64>, done: oneshot::Sender<()> },
}

struct State {
    trie: Trie,
    sessions: HashMap<SessionId, Arc<SessionSlot>>,
    by_client: HashMap<Arc<str>, SessionId>,
    /// Next offset to route, per assigned partition (pushed or tailed).
    positions: HashMap<TopicPartition, u64>,
    /// Core topics assigned to the tail.
    assigned: HashMap<Arc<str>, u32>,
    /// Core topics known to exist that are not tailed (published to, not subscribed to).
    writable: HashMap<Arc<str>, u32>,
    /// Local members per share group (consumer-group mode: readers run while there are some).
    share_members: HashMap<Arc<str>, usize>,
    /// Consumer-group readers running, per (share group, core topic).
    group_readers: HashSet<(Arc<str>, Arc<str>)>,
    /// Recently routed records, for sessions re-attaching ([`Router::reattach`]).
    rings: ReplayRings,
}

impl State {
    fn new(max_replay_bytes: usize) -> State {
        State {
            trie: Trie::default(),
            sessions: HashMap::new(),
            by_client: HashMap::new(),
            positions: HashMap::new(),
            assigned: HashMap::new(),
            writable: HashMap::new(),
            share_members: HashMap::new(),
            group_readers: HashSet::new(),
            rings: ReplayRings::new(max_replay_bytes),
        }
    }

    fn count_share_member(&mut self, group: &str, delta: isize) {
        let n = self.share_members.entry(group.into()).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            self.share_members.remove(group);
        }
    }
}

/// The router's counters: handles on the metrics (`crate::metrics`), resolved once.
#[derive(Debug, Clone)]
pub struct RouterStats {
    pub routed: prometheus::IntCounter,
    pub dropped_qos0: prometheus::IntCounter,
    pub dropped_shared: prometheus::IntCounter,
    pub lag_events: prometheus::IntCounter,
    /// Drops of traced messages become trace events.
    pub tracer: Arc<crate::trace::Tracer>,
}

impl RouterStats {
    pub fn new(m: &crate::metrics::Metrics, tracer: Arc<crate::trace::Tracer>) -> RouterStats {
        RouterStats {
            routed: m.routed.clone(),
            dropped_qos0: m.dropped_qos0.clone(),
            dropped_shared: m.dropped_shared.clone(),
            lag_events: m.lag_events.clone(),
            tracer,
        }
    }
}

/// What clients may make the router hold (from `limits`).
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Bytes of the replay rings (all partitions).
    pub max_replay_bytes: usize,
    /// Core topics created or read for parents accepted by `*` (declared ones not counted).
    pub max_core_topics: usize,
}

impl RouterLimits {
    pub fn new(limits: &crate::config::LimitsConfig) -> RouterLimits {
        RouterLimits { max_replay_bytes: limits.max_replay_bytes, max_core_topics: limits.max_core_topics }
    }
}

pub struct Router {
    /// This router, for registering it as a [`LiveSink`].
    me: std::sync::Weak<Router>,
    limits: RouterLimits,
    state: Mutex<State>,
    /// What a PUBLISH needs to know, readable without `state`, which routing holds
    /// while it routes a batch: the core topics known here (`true`: tailed), and whether a
    /// subscription's filter starts with a wildcard (then every topic is tailed).
    known: parking_lot::RwLock<HashMap<Arc<str>, bool>>,
    root_wildcard: AtomicBool,
    retained: retained::RetainedIndex,
    topics: TopicMap,
    backend: SharedCoreService,
    commands: mpsc::Sender<Command>,
    next_id: AtomicU64,
    pub stats: RouterStats,
    /// Shared subscriptions go through the core service's consumer groups (`groups.rs`).
    consumer_groups: bool,
}

impl Router {
    /// Start the router: load retained messages, assign declared topics and spawn the
    /// dispatcher. The returned handle stops nothing on drop; the dispatcher ends when the
    /// core service's tail fails for good or the process exits.
    pub async fn start(
        backend: SharedCoreService,
        topics: TopicMap,
        stats: RouterStats,
        limits: RouterLimits,
    ) -> Result<Arc<Router>, RouterError> {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let router = Arc::new_cyclic(|me| Router {
            me: me.clone(),
            limits,
            state: Mutex::new(State::new(limits.max_replay_bytes)),
            known: Default::default(),
            root_wildcard: AtomicBool::new(false),
            retained: retained::RetainedIndex::new(),
            topics,
            backend: backend.clone(),
            commands: cmd_tx,
            next_id: AtomicU64::new(1),
            stats,
            consumer_groups: backend.has_consumer_groups(),
        });
        // Retained messages: indexed in the background (SUBSCRIBEs wait for it), then every
        // update from any gateway.
        let (upd_tx, upd_rx) = mpsc::channel::<StateUpdate>(1024);
        backend.follow_state(StateStore::Retained, upd_tx).await?;
        tokio::spawn(retained::load(Arc::downgrade(&router), upd_rx));
        let tail = backend.tail();
        tokio::spawn(dispatch(Arc::downgrade(&router), tail, cmd_rx));
        let declared: Vec<CoreTopic> = router.topics.declared().map(|(_, t)| t.clone()).collect();
        for t in declared {
            router.ensure_core_topic(&t).await?;
        }
        Ok(router)
    }

    pub fn topics(&self) -> &TopicMap {
        &self.topics
    }

    pub fn backend(&self) -> &SharedCoreService {
        &self.backend
    }

    /// Make sure a publish to `topic` can be stored: the core topic exists. The topic is
    /// tailed only for subscriptions (and P2P messages, whose target may be connected here
    /// without subscribing): a gateway does not read back what only flows through it.
    pub async fn ensure_for_publish(&self, topic: &CoreTopic, mqtt_topic: &str) -> Result<(), RouterError> {
        self.refuse_reserved(topic)?;
        let read_here = self.topics.p2p_target(mqtt_topic).is_some() || self.root_wildcard.load(Ordering::Acquire);
        match self.known.read().get(&topic.name) {
            Some(true) => return Ok(()),
            Some(false) if !read_here => return Ok(()),
            _ => {}
        }
        if read_here {
            return self.ensure_core_topic(topic).await;
        }
        self.ensure_known(topic).await
    }

    /// Make sure the core topic exists and the core service knows it here (for writing to it
    /// or reading it back once), without tailing it.
    pub async fn ensure_known(&self, topic: &CoreTopic) -> Result<(), RouterError> {
        self.refuse_reserved(topic)?;
        if !self.room_for(topic)? {
            return Ok(());
        }
        self.backend.ensure_topic(&topic.name, topic.partitions).await?;
        self.state.lock().writable.insert(topic.name.clone(), topic.partitions);
        self.known.write().entry(topic.name.clone()).or_insert(false);
        Ok(())
    }

    /// Whether `topic` is new here (`Ok(false)`: written or read already); a new core topic
    /// for a `*` parent beyond `limits.max_core_topics` is refused.
    fn room_for(&self, topic: &CoreTopic) -> Result<bool, RouterError> {
        let st = self.state.lock();
        if st.assigned.contains_key(&topic.name) || st.writable.contains_key(&topic.name) {
            return Ok(false);
        }
        if self.topics.is_declared_core(&topic.name) {
            return Ok(true);
        }
        let dynamic =
            st.assigned.keys().chain(st.writable.keys()).filter(|name| !self.topics.is_declared_core(name)).count();
        if dynamic >= self.limits.max_core_topics {
            return Err(RouterError::TopicLimit(topic.name.to_string()));
        }
        Ok(true)
    }

    /// Create the core topic if needed and route its records from now on: pushed by the core
    /// service where it can, else tailed by the dispatcher.
    pub async fn ensure_core_topic(&self, topic: &CoreTopic) -> Result<(), RouterError> {
        self.refuse_reserved(topic)?;
        if self.state.lock().assigned.contains_key(&topic.name) {
            return Ok(());
        }
        self.room_for(topic)?;
        self.backend.ensure_topic(&topic.name, topic.partitions).await?;
        if self.push_from_now(topic)? {
            return Ok(());
        }
        // The partitions' ends are read here, all at once, not by the dispatcher: it routes
        // every session's records and must not wait for the core service on one topic's
        // behalf. Tailing starts at these ends; a record appended meanwhile is after them.
        let partitions = self.backend.partitions(&topic.name)?;
        let ends = futures::future::try_join_all(
            (0..partitions).map(|p| self.backend.end_offset(&TopicPartition::new(topic.name.clone(), p))),
        )
        .await?;
        let (done, rx) = oneshot::channel();
        let assign = Command::Assign { topic: topic.clone(), ends, done };
        self.commands.send(assign).await.map_err(|_| RouterError::Stopped)?;
        rx.await.map_err(|_| RouterError::Stopped)?;
        Ok(())
    }

    /// Have the core service push `topic`'s records to this router from now on; false when it
    /// cannot push (the dispatcher tails the topic then). Under the lock, so that a pushed
    /// batch finds its partition's position set.
    fn push_from_now(&self, topic: &CoreTopic) -> Result<bool, RouterError> {
        let partitions = self.backend.partitions(&topic.name)?;
        let sink: std::sync::Weak<dyn LiveSink> = self.me.clone();
        let mut st = self.state.lock();
        if st.assigned.contains_key(&topic.name) {
            return Ok(true);
        }
        for p in 0..partitions {
            let tp = TopicPartition::new(topic.name.clone(), p);
            match self.backend.push_to(&tp, sink.clone()) {
                None => return Ok(false),
                Some(from) => {
                    st.positions.insert(tp, from?);
                }
            }
        }
        st.writable.remove(&topic.name);
        st.assigned.insert(topic.name.clone(), partitions);
        self.known.write().insert(topic.name.clone(), true);
        Ok(true)
    }

    /// Register a connected session; its deliveries arrive on the returned receiver.
    pub fn register(&self, client_id: Arc<str>, capacity: usize) -> (Arc<SessionSlot>, queue::Receiver) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(SessionSlot::new(id, client_id.clone(), capacity));
        let rx = queue::Receiver(slot.clone());
        let mut st = self.state.lock();
        st.sessions.insert(id, slot.clone());
        st.by_client.insert(client_id, id);
        (slot, rx)
    }

    /// Remove a session and all its subscriptions.
    pub fn unregister(&self, slot: &SessionSlot, filters: &[String]) {
        let mut st = self.state.lock();
        for f in filters {
            if let Ok(p) = topic::parse_filter(f) {
                if st.trie.remove(p.group, p.filter, slot.id) {
                    if let Some(g) = p.group {
                        st.count_share_member(g, -1);
                    }
                }
            }
        }
        self.root_wildcard.store(st.trie.has_root_wildcard(), Ordering::Release);
        st.sessions.remove(&slot.id);
        if st.by_client.get(&slot.client_id) == Some(&slot.id) {
            st.by_client.remove(&slot.client_id);
        }
    }

    /// The router never tails or creates a reserved topic for MQTT traffic, whoever asks:
    /// the events topic is read only by `session::takeover`, state topics only by the core
    /// service's state stores.
    fn refuse_reserved(&self, topic: &CoreTopic) -> Result<(), RouterError> {
        if self.topics.is_reserved(&topic.name) {
            return Err(RouterError::Reserved(topic.name.to_string()));
        }
        Ok(())
    }

    /// Core topics a filter can receive records from.
    pub fn core_topics_for_filter(&self, filter: &str) -> Result<Vec<CoreTopic>, RouterError> {
        let parent = topic::parent(filter);
        if parent == "+" || parent == "#" {
            // Every core topic this gateway knows: tailed ones and those only published to,
            // never a reserved one (none gets there; checked again because a wildcard must
            // not widen the namespace).
            let st = self.state.lock();
            let known = st.assigned.iter().chain(st.writable.iter()).filter(|(n, _)| !self.topics.is_reserved(n));
            return Ok(known.map(|(n, p)| CoreTopic { name: n.clone(), partitions: *p }).collect());
        }
        match self.topics.resolve(parent) {
            Ok(t) => Ok(vec![t]),
            Err(mapping::Unmapped::Undeclared) => Err(RouterError::UndeclaredParent(parent.into())),
            Err(mapping::Unmapped::Reserved) => Err(RouterError::Reserved(parent.into())),
        }
    }

    /// Add a subscription (full filter, possibly `$share/...`). Returns the partitions it
    /// reads and, for each, the offset from which live delivery starts.
    pub async fn subscribe(
        self: &Arc<Self>,
        slot: &SessionSlot,
        raw_filter: &str,
        qos: QoS,
    ) -> Result<Vec<(TopicPartition, u64)>, RouterError> {
        self.prepare_subscribe(raw_filter).await?;
        self.attach(slot, raw_filter, qos)
    }

    /// The waiting part of a subscription: its core topics exist and are tailed here (and a
    /// shared subscription's group readers run). [`Router::attach`] then adds it at once.
    pub async fn prepare_subscribe(self: &Arc<Self>, raw_filter: &str) -> Result<(), RouterError> {
        let parsed = topic::parse_filter(raw_filter).map_err(|_| RouterError::UndeclaredParent(raw_filter.into()))?;
        let cores = self.core_topics_for_filter(parsed.filter)?;
        for t in &cores {
            self.ensure_core_topic(t).await?;
        }
        if let Some(g) = parsed.group.filter(|_| self.consumer_groups) {
            self.start_group_readers(g, &cores)?;
        }
        Ok(())
    }

    /// Add a subscription whose core topics are ready ([`Router::prepare_subscribe`]).
    /// Returns the partitions it reads and, for each, the offset from which live delivery
    /// starts (a core topic not tailed here has none: nothing is routed from it).
    pub fn attach(
        &self,
        slot: &SessionSlot,
        raw_filter: &str,
        qos: QoS,
    ) -> Result<Vec<(TopicPartition, u64)>, RouterError> {
        let parsed = topic::parse_filter(raw_filter).map_err(|_| RouterError::UndeclaredParent(raw_filter.into()))?;
        let cores = self.core_topics_for_filter(parsed.filter)?;
        let mut st = self.state.lock();
        match parsed.group {
            None => {
                st.trie.insert(parsed.filter, slot.id, qos);
            }
            Some(g) => {
                if st.trie.insert_shared(g, parsed.filter, slot.id, qos) {
                    st.count_share_member(g, 1);
                }
            }
        };
        self.root_wildcard.store(st.trie.has_root_wildcard(), Ordering::Release);
        let mut out = Vec::new();
        for t in &cores {
            for p in 0..t.partitions {
                let tp = TopicPartition::new(t.name.clone(), p);
                if let Some(pos) = st.positions.get(&tp) {
                    out.push((tp, *pos));
                }
            }
        }
        Ok(out)
    }

    /// Live positions of the given core topics (for P2P and restored sessions).
    pub fn positions(&self, topics: &[CoreTopic]) -> Vec<(TopicPartition, u64)> {
        let st = self.state.lock();
        let mut out = Vec::new();
        for t in topics {
            for p in 0..t.partitions {
                let tp = TopicPartition::new(t.name.clone(), p);
                if let Some(pos) = st.positions.get(&tp) {
                    out.push((tp, *pos));
                }
            }
        }
        out
    }

    /// Routing positions of the given partitions: every record below has been offered to
    /// the sessions it matched.
    pub fn positions_of(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, u64)> {
        let st = self.state.lock();
        tps.iter().filter_map(|tp| st.positions.get(tp).map(|p| (tp.clone(), *p))).collect()
    }

    /// Records appended to the routed partitions that the router has not routed yet
    /// (`lmq_consumer_lag_records`); partitions whose end cannot be read count 0.
    pub async fn lag(&self) -> u64 {
        let positions: Vec<(TopicPartition, u64)> =
            self.state.lock().positions.iter().map(|(tp, p)| (tp.clone(), *p)).collect();
        let mut lag = 0u64;
        for (tp, pos) in positions {
            if let Ok(end) = self.backend.end_offset(&tp).await {
                lag += end.saturating_sub(pos);
            }
        }
        lag
    }

    /// Every core topic currently tailed.
    pub fn assigned_topics(&self) -> Vec<CoreTopic> {
        let st = self.state.lock();
        st.assigned.iter().map(|(n, p)| CoreTopic { name: n.clone(), partitions: *p }).collect()
    }

    pub fn unsubscribe(&self, slot: &SessionSlot, raw_filter: &str) -> bool {
        let Ok(parsed) = topic::parse_filter(raw_filter) else { return false };
        let mut st = self.state.lock();
        let removed = st.trie.remove(parsed.group, parsed.filter, slot.id);
        if let (true, Some(g)) = (removed, parsed.group) {
            st.count_share_member(g, -1);
        }
        self.root_wildcard.store(st.trie.has_root_wildcard(), Ordering::Release);
        removed
    }

    /// Consumer-group mode: make sure this gateway has a member of share group `group` on
    /// each of `cores`.
    fn start_group_readers(self: &Arc<Self>, group: &str, cores: &[CoreTopic]) -> Result<(), RouterError> {
        for t in cores {
            let key: (Arc<str>, Arc<str>) = (group.into(), t.name.clone());
            if !self.state.lock().group_readers.insert(key.clone()) {
                continue;
            }
            match self.backend.group_tail(group, &t.name) {
                Ok(member) => {
                    tokio::spawn(groups::run(Arc::downgrade(self), key.0, key.1, member));
                }
                Err(e) => {
                    self.state.lock().group_readers.remove(&key);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Resume live delivery of `tp` to `slot` from offset `from`: at once when routing has
    /// not passed `from`, with the records since `from` handed over as one replay when the
    /// replay ring still holds them all, else [`Reattach::Behind`]. Under the lock that
    /// routing takes, so no record is offered twice or skipped in between.
    pub fn reattach(&self, slot: &SessionSlot, tp: &TopicPartition, from: u64) -> Reattach {
        let st = self.state.lock();
        let pos = st.positions.get(tp).copied().unwrap_or(0);
        if pos <= from {
            slot.clear_lagging(tp);
            return Reattach::Attached;
        }
        let Some(ring) = st.rings.get(tp) else { return Reattach::Behind(from) };
        let covered = ring.front().is_some_and(|(rec, _)| rec.offset <= from);
        if !covered {
            return Reattach::Behind(from);
        }
        let records: Vec<_> = ring.iter().filter(|(rec, _)| rec.offset >= from).cloned().collect();
        match slot.queue.try_send(Delivery::Replay(Box::new(records))) {
            Ok(()) => {
                slot.clear_lagging(tp);
                Reattach::Attached
            }
            Err(_) => Reattach::Behind(from),
        }
    }

    /// The first `limit` unexpired retained messages matching a filter (not `$share`), in
    /// topic order — their topics, and the message where this gateway still holds it — and
    /// how many matched in all ([`retained::RetainedIndex::matching`]). The messages are read
    /// with [`Router::retained_messages`].
    pub fn retained_matching(&self, filter: &str, limit: usize, now_ms: i64) -> (Vec<RetainedMatch>, usize) {
        self.retained.matching(filter, limit, now_ms)
    }

    /// Wait until the retained index holds the whole retained store (it is loaded in the
    /// background at start), at most `limit`; false if it does not by then.
    pub async fn retained_loaded(&self, limit: std::time::Duration) -> bool {
        self.retained.wait_loaded(limit).await
    }

    /// The retained messages of `matches` (from [`Router::retained_matching`]): held ones as
    /// they are, the others read from this gateway's view of the retained store; one that
    /// changed to nothing or expired since is left out.
    pub async fn retained_messages(&self, matches: Vec<RetainedMatch>, now_ms: i64) -> Vec<Arc<Message>> {
        let reads = matches.into_iter().map(|(topic, held)| async move {
            match held {
                Some(m) => Some(m),
                None => {
                    let value = self.backend.peek_state(StateStore::Retained, &topic).await.ok()??;
                    self.retained_message(&topic, value)
                }
            }
        });
        futures::future::join_all(reads).await.into_iter().flatten().filter(|m| !m.expired(now_ms)).collect()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.count()
    }

    /// Whether a retained message of `payload_len` bytes on `topic` fits within `max_count`
    /// messages and `max_bytes` bytes (replacing the topic's current one, if any).
    pub fn retained_room(&self, topic: &str, payload_len: usize, max_count: usize, max_bytes: usize) -> bool {
        self.retained.room(topic, payload_len, max_count, max_bytes)
    }

    /// Apply a retained-message change made by this gateway (the core service's update
    /// stream will confirm it; applying it now makes it visible at once: the message is held
    /// until then, since this gateway's view of the store may not have it yet).
    pub fn apply_retained(&self, topic: &str, message: Option<Arc<Message>>) {
        self.retained.index(topic, message, true);
    }

    /// A retained store value as the message subscribers get (`None`: not a message, or under
    /// a reserved parent topic).
    fn retained_message(&self, topic: &str, value: bytes::Bytes) -> Option<Arc<Message>> {
        // A retained entry under a reserved parent (stored before the namespace existed, or
        // written around the gateway) is never offered to subscribers.
        let parent = topic::parent(topic);
        if self.topics.resolve(parent) == Err(mapping::Unmapped::Reserved) {
            return None;
        }
        let rec = mapping::decode_record(value)?;
        mapping::record_to_message(parent, &rec).map(Arc::new)
    }

    fn apply_retained_value(&self, topic: &str, value: Option<bytes::Bytes>) {
        let message = value.and_then(|v| self.retained_message(topic, v));
        self.retained.index(topic, message, false);
    }

    /// Route a batch of records: each partition's in offset order, those below the
    /// partition's routing position skipped (routed already).
    fn route(&self, records: &[Arc<Record>]) {
        // Decoded before the lock is taken: publishers and subscribers wait for it.
        let decoded: Vec<(&Arc<Record>, Option<Arc<Message>>)> = records
            .iter()
            .map(|record| (record, self.topics.message_of(&record.tp.topic, &record.record).map(Arc::new)))
            .collect();
        let mut st = self.state.lock();
        let mut plain: Vec<PlainMatch> = Vec::new();
        let mut sent: HashSet<SessionId> = HashSet::new();
        for (record, message) in decoded {
            let pos = st.positions.entry(record.tp.clone()).or_insert(0);
            if record.offset < *pos {
                continue;
            }
            *pos = record.offset + 1;
            if let Some(message) = message {
                st.rings.push(record, &message);
                self.route_one(&mut st, record, &message, &mut plain, &mut sent);
            }
        }
    }

    fn route_one(
        &self,
        st: &mut State,
        record: &Arc<Record>,
        message: &Arc<Message>,
        plain: &mut Vec<PlainMatch>,
        sent: &mut HashSet<SessionId>,
    ) {
        self.stats.routed.inc();
        let State { trie, sessions, by_client, .. } = st;
        if let Some(target) = self.topics.p2p_target(&message.topic) {
            // P2P: only the target client, no subscription needed.
            if let Some(slot) = by_client.get(target).and_then(|id| sessions.get(id)) {
                self.offer(slot, record, message, message.qos);
            }
            return;
        }
        plain.clear();
        sent.clear();
        let mut groups = Vec::new();
        trie.matches(&message.topic, plain, &mut groups);
        // One delivery per session, at the highest QoS of its matching subscriptions.
        plain.sort_by_key(|m| (m.session, std::cmp::Reverse(m.qos)));
        for m in plain.iter() {
            if !sent.insert(m.session) {
                continue;
            }
            if let Some(slot) = sessions.get(&m.session) {
                self.offer(slot, record, message, message.qos.min(m.qos));
            }
        }
        // In consumer-group mode the group readers deliver shared subscriptions.
        let groups = if self.consumer_groups { Vec::new() } else { groups };
        for (group, g) in groups {
            let n = g.members.len();
            let mut delivered = false;
            for i in 0..n {
                let (sid, _qos) = g.members[(g.next + i) % n];
                let Some(slot) = sessions.get(&sid) else { continue };
                if slot.is_lagging(&record.tp) {
                    continue;
                }
                let d = Delivery::Shared(Box::new((record.clone(), message.clone(), g.full.clone())));
                if slot.queue.try_send(d).is_ok() {
                    g.next = (g.next + i + 1) % n;
                    delivered = true;
                    break;
                }
            }
            if !delivered {
                self.stats.tracer.on(Kind::Dropped, (&message.topic, message.msg_id.as_deref()), "", || {
                    format!("shared group `{group}` cannot keep up")
                });
                if message.qos == QoS::AtMostOnce {
                    self.stats.dropped_qos0.inc();
                } else {
                    self.stats.dropped_shared.inc();
                    tracing::warn!(group, topic = %message.topic, "shared subscription group cannot keep up; message not delivered to the group");
                }
            }
        }
    }

    /// Offer a delivery to a session without waiting.
    fn offer(&self, slot: &SessionSlot, record: &Arc<Record>, message: &Arc<Message>, qos: QoS) {
        if slot.is_lagging(&record.tp) {
            return;
        }
        let d = Delivery::Live(record.clone(), message.clone());
        match slot.queue.try_send(d) {
            Ok(()) => {}
            Err(queue::Refused::Full(_)) if qos == QoS::AtMostOnce => {
                self.stats.dropped_qos0.inc();
                self.stats.tracer.on(
                    Kind::Dropped,
                    (&message.topic, message.msg_id.as_deref()),
                    &slot.client_id,
                    || "QoS 0: subscriber's queue full".into(),
                );
            }
            Err(queue::Refused::Full(_)) => {
                self.stats.lag_events.inc();
                slot.mark_lagging(record.tp.clone(), record.offset);
            }
            Err(queue::Refused::Closed(_)) => {}
        }
    }
}

impl LiveSink for Router {
    fn offer(&self, records: &[Arc<Record>]) {
        self.route(records);
    }
}

/// The dispatcher: tails the core topics that are not pushed.
async fn dispatch(router: std::sync::Weak<Router>, mut tail: Box<dyn Tail>, mut commands: mpsc::Receiver<Command>) {
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                let Some(r) = router.upgrade() else { return };
                let Command::Assign { topic, ends, done } = cmd;
                assign(&r, tail.as_mut(), &topic, ends);
                let _ = done.send(());
            }
            batch = tail.poll() => {
                let Some(r) = router.upgrade() else { return };
                match batch {
                    Ok(records) => r.route(&records),
                    Err(crate::backend::BackendError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading from the core service failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
}

/// Start tailing `topic`'s partitions from `ends` (a topic tailed already stays as it is).
fn assign(r: &Router, tail: &mut dyn Tail, topic: &CoreTopic, ends: Vec<u64>) {
    if r.state.lock().assigned.contains_key(&topic.name) {
        return;
    }
    let partitions = u32::try_from(ends.len()).unwrap_or(u32::MAX);
    for (p, end) in (0..partitions).zip(ends) {
        let tp = TopicPartition::new(topic.name.clone(), p);
        tail.assign(tp.clone(), end);
        r.state.lock().positions.insert(tp, end);
    }
    let mut st = r.state.lock();
    st.writable.remove(&topic.name);
    st.assigned.insert(topic.name.clone(), partitions);
    r.known.write().insert(topic.name.clone(), true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CoreRecord;

    fn routed(topic: &str, offset: u64, bytes: usize) -> (Arc<Record>, Arc<Message>) {
        let record = CoreRecord { key: None, headers: Vec::new(), value: vec![0; bytes].into(), timestamp_ms: 0 };
        let message = Message { topic: topic.into(), payload: record.value.clone(), ..Message::default() };
        (Arc::new(Record { tp: TopicPartition::new(topic, 0), offset, record }), Arc::new(message))
    }

    fn offsets(rings: &ReplayRings, topic: &str) -> Vec<u64> {
        rings.get(&TopicPartition::new(topic, 0)).map_or(Vec::new(), |r| r.iter().map(|(rec, _)| rec.offset).collect())
    }

    #[test]
    fn replay_rings_are_bounded_in_bytes_over_all_partitions() {
        let size = routed("a", 0, 1000).0.record.memory_size();
        let mut rings = ReplayRings::new(10 * size);
        for i in 0..4 {
            let (r, m) = routed("quiet", i, 1000);
            rings.push(&r, &m);
        }
        for i in 0..20 {
            let (r, m) = routed("busy", i, 1000);
            rings.push(&r, &m);
            assert!(rings.bytes <= 10 * size);
        }
        // The oldest records went first, whatever their partition; what is left has no gaps.
        assert_eq!(offsets(&rings, "quiet"), Vec::<u64>::new());
        assert_eq!(offsets(&rings, "busy"), (10..20).collect::<Vec<_>>());
        assert_eq!(rings.bytes, 10 * size);
        // A record too large to keep restarts its partition's ring after it.
        let (r, m) = routed("busy", 20, 5 * size);
        rings.push(&r, &m);
        assert_eq!(offsets(&rings, "busy"), Vec::<u64>::new());
        assert_eq!(rings.bytes, 0);
        let (r, m) = routed("busy", 21, 1000);
        rings.push(&r, &m);
        assert_eq!(offsets(&rings, "busy"), vec![21]);
        // The record count is bounded too (the order queue included).
        let mut rings = ReplayRings::new(usize::MAX);
        for i in 0..(REPLAY_RECORDS as u64 + 10) {
            let (r, m) = routed("many", i, 0);
            rings.push(&r, &m);
        }
        assert_eq!(rings.order.len(), REPLAY_RECORDS);
        assert_eq!(offsets(&rings, "many").first(), Some(&10));
    }

    /// A router on an embedded log in `dir` (which pushes), with a session subscribed to `t/#`.
    async fn pushed_router(dir: &std::path::Path) -> (Arc<Router>, Arc<SessionSlot>, queue::Receiver) {
        let config = crate::config::EmbeddedConfig { data_dir: dir.into(), ..Default::default() };
        let core: SharedCoreService = crate::backend::embedded::EmbeddedCore::open(&config, "events").await.unwrap();
        let metrics = crate::metrics::Metrics::new();
        let trace = crate::config::TraceConfig::default();
        let (tracer, _events) = crate::trace::Tracer::new(&trace, "gw", metrics.trace_dropped.clone());
        let config: crate::config::TopicsConfig =
            serde_yaml_ng::from_str("parents: [{name: '*', partitions: 1}]").unwrap();
        let topics = TopicMap::new(&config, Default::default());
        let limits = RouterLimits::new(&crate::config::LimitsConfig::default());
        let router = Router::start(core, topics, RouterStats::new(&metrics, tracer), limits).await.unwrap();
        let (slot, rx) = router.register("sub".into(), 64);
        router.subscribe(&slot, "t/#", QoS::AtLeastOnce).await.unwrap();
        (router, slot, rx)
    }

    fn offset_of(d: Delivery) -> u64 {
        match d {
            Delivery::Live(record, _) => record.offset,
            other => panic!("not a live delivery: {other:?}"),
        }
    }

    #[tokio::test]
    async fn pushed_records_are_routed_once_in_order_and_replayed_on_reattach() {
        let dir = tempfile::tempdir().unwrap();
        let (router, slot, rx) = pushed_router(dir.path()).await;
        let core = router.topics().resolve("t").unwrap();
        let tp = TopicPartition::new(core.name.clone(), 0);
        let mut records = Vec::new();
        for i in 0..3u8 {
            let message =
                Message { topic: "t/a".into(), payload: vec![i].into(), qos: QoS::AtLeastOnce, ..Message::default() };
            let pos = router.backend().append(&core.name, router.topics().to_record(&message)).await.unwrap();
            // Delivered by the time the append is acknowledged: the writer pushed it first.
            let delivered = rx.try_recv().expect("delivered before the acknowledgement");
            assert_eq!(offset_of(delivered), pos.offset);
            records.push(router.backend().fetch(&tp, pos.offset, 1).await.unwrap().records.remove(0));
        }
        assert_eq!(router.positions_of(std::slice::from_ref(&tp)), vec![(tp.clone(), 3)]);
        // The same records offered again (a push racing a registration, a tail re-reading)
        // are not routed again.
        LiveSink::offer(&*router, &records);
        assert!(rx.try_recv().is_none());
        // A session that fell behind at offset 1 gets 1 and 2 back as one replay.
        assert_eq!(router.reattach(&slot, &tp, 1), Reattach::Attached);
        match rx.try_recv() {
            Some(Delivery::Replay(replay)) => {
                assert_eq!(replay.iter().map(|(r, _)| r.offset).collect::<Vec<_>>(), vec![1, 2]);
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        // Up to date: attached with nothing to replay.
        assert_eq!(router.reattach(&slot, &tp, 3), Reattach::Attached);
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn deliveries_stay_small() {
        // Every connection's queue holds blocks of these; keep them at two words + tag.
        assert!(std::mem::size_of::<Delivery>() <= 24, "{}", std::mem::size_of::<Delivery>());
    }
}
