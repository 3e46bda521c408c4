//! The core-service boundary: everything that must outlive a connection or a gateway
//! process goes through [`CoreService`].
//!
//! The gateway speaks to every core service (embedded log, Kafka, RocketMQ) in the same
//! Kafka-like terms: topics split into partitions, records with key / headers / value
//! appended at offsets, a live tail, one-shot reads from a position, and keyed state
//! (persistent sessions, retained messages, device credentials, revoked tokens) that every gateway instance converges on.
//! Nothing here knows MQTT: the mapping between MQTT messages and records (LMQ header names)
//! lives in `router::mapping`, and session state arrives as opaque bytes.
//!
//! Rule of the trait: the [`AppendAck`] of [`CoreService::enqueue`] (and the future of
//! [`CoreService::append`]) resolves `Ok` only once the record is durably accepted (per the
//! service's durability policy). The session sends PUBACK / PUBREC after that and never before.

pub mod diskstate;
pub mod embedded;
mod error;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rocketmq")]
pub mod rocketmq;

use bytes::Bytes;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;

use crate::events::{ClientEvent, GATEWAY_HEADER, TYPE_HEADER};

pub use error::{BackendError, BoxError};

/// One record as the core service stores it (Kafka's model: key, headers, value, time).
#[derive(Clone, PartialEq, Eq)]
pub struct CoreRecord {
    pub key: Option<Bytes>,
    /// Header names and values, in order (LMQ names: `topic`, `qoslevel`, `clientId`, ...).
    pub headers: Vec<(String, Bytes)>,
    pub value: Bytes,
    /// Creation time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl CoreRecord {
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Bytes this record holds in memory (key, headers, value, plus a fixed overhead per
    /// record and header), for caches bounded in bytes.
    pub fn memory_size(&self) -> usize {
        const RECORD_OVERHEAD: usize = 96;
        const HEADER_OVERHEAD: usize = 48;
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD).sum();
        RECORD_OVERHEAD + self.key.as_ref().map_or(0, |k| k.len()) + headers + self.value.len()
    }
}

impl fmt::Debug for CoreRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreRecord")
            .field("key", &self.key)
            .field("headers", &self.headers)
            .field("value_len", &self.value.len())
            .field("timestamp_ms", &self.timestamp_ms)
            .finish()
    }
}

// Defined here rather than in `events`, so that `events` (a leaf) does not import `backend`.
impl ClientEvent {
    /// The event as a record (every core service): key = ClientId, headers `eventType` and
    /// [`GATEWAY_HEADER`] (= `gatewayId`), value = the LMQ JSON body.
    pub fn to_record(&self) -> CoreRecord {
        CoreRecord {
            key: Some(Bytes::from(self.client_id.clone().into_bytes())),
            headers: vec![
                (TYPE_HEADER.to_owned(), Bytes::from_static(self.event_type.as_str().as_bytes())),
                (GATEWAY_HEADER.to_owned(), Bytes::from(self.gateway_id.clone().into_bytes())),
            ],
            value: Bytes::from(self.to_json()),
            timestamp_ms: self.time,
        }
    }
}

/// A (topic, partition) pair of the core service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// A stored record with its position. Shared (`Arc`) so that fan-out never copies payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub tp: TopicPartition,
    pub offset: u64,
    pub record: CoreRecord,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// Result of a one-shot read.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Records with offsets `>= from`, in offset order (may be empty).
    pub records: Vec<Arc<Record>>,
    /// Offset to read from next time.
    pub next_offset: u64,
    /// Offset the next appended record will get (the end of the log).
    pub high_watermark: u64,
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The acknowledgement of a queued record: resolves once the record is durable.
pub type AppendAck = BoxFuture<'static, Result<Position>>;

/// Keyed-state stores, each a compacted keyspace shared by all gateway instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateStore {
    /// Persistent MQTT sessions, key = ClientId, value = opaque bytes from `session::persist`.
    Sessions,
    /// Retained messages, key = MQTT topic, value = an encoded [`CoreRecord`].
    Retained,
    /// Device credentials, key = device AccessKeyId, value = JSON from `auth::credential`.
    Credentials,
    /// Revoked token ids, key = `jti`, value = JSON with the token's expiry (`auth::token`);
    /// an entry may be deleted once the token has expired on its own.
    RevokedTokens,
    /// Checkpoints of the delayed-message forwarders, key = level topic and partition, value = JSON from
    /// `delay::forward` (what is being moved and where to look for it after a crash).
    Delay,
}

impl StateStore {
    /// Every store, for engines that open them all.
    pub const ALL: [StateStore; 5] = [
        StateStore::Sessions,
        StateStore::Retained,
        StateStore::Credentials,
        StateStore::RevokedTokens,
        StateStore::Delay,
    ];
}

/// A change to a [`StateStore`]: `None` value = deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUpdate {
    pub store: StateStore,
    pub key: String,
    pub value: Option<Bytes>,
}

/// The live tail of the core service: records appended after the assigned positions.
/// Like a Kafka consumer with manual assignment.
pub trait Tail: Send {
    /// Start (or restart) delivering records of `tp` from offset `from`.
    fn assign(&mut self, tp: TopicPartition, from: u64);
    /// Stop delivering records of `tp`.
    fn unassign(&mut self, tp: &TopicPartition);
    /// Wait for the next records of assigned partitions (each partition in offset order).
    /// Cancel-safe: dropping the future loses nothing.
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>>;
}

/// Where a core service that can push hands the records of a partition as they become
/// visible (the router): called by whoever made them visible, at once, in offset order per
/// partition, possibly from several tasks for different partitions. Must not wait.
pub trait LiveSink: Send + Sync {
    fn offer(&self, records: &[Arc<Record>]);
}

/// A member of one of the core service's consumer groups: the partitions of a topic are split
/// among all members of the group, across gateway processes, so each record reaches one
/// member. Like a Kafka consumer with `subscribe`.
pub trait GroupTail: Send {
    /// Wait for the next records of the partitions currently assigned to this member.
    /// Cancel-safe.
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>>;
    /// The record was handed on: the group continues after it (committed in the background).
    fn done(&mut self, record: &Record);
}

/// A core service. One instance per gateway process, shared by all connections.
pub trait CoreService: Send + Sync + 'static {
    /// `embedded`, `kafka`, `rocketmq`.
    fn kind(&self) -> &'static str;

    /// Make sure `topic` exists with at least `partitions` partitions.
    fn ensure_topic(&self, topic: &str, partitions: u32) -> BoxFuture<'_, Result<()>>;

    /// [`CoreService::ensure_topic`] for a topic whose records are kept `retention_ms` when the
    /// service supports retention per topic and creates it now (Kafka: `retention.ms`); others
    /// keep their own retention.
    fn ensure_topic_with_retention(
        &self,
        topic: &str,
        partitions: u32,
        _retention_ms: u64,
    ) -> BoxFuture<'_, Result<()>> {
        self.ensure_topic(topic, partitions)
    }

    /// Number of partitions of an existing topic.
    fn partitions(&self, topic: &str) -> Result<u32>;

    /// Queue a record for appending. The partition is chosen from the key (same key, same
    /// partition) or round-robin without a key. The returned future resolves once the record
    /// has its place in the partition's order — it waits while the service's queue is full
    /// (back-pressure) — and yields the [`AppendAck`], which resolves once the record is
    /// durable. Records queued one after another, each `enqueue` awaited before the next is
    /// called, are stored in that order: this is how a publisher's order is kept.
    fn enqueue(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<AppendAck>>;

    /// Queue a record and wait until it is durable.
    fn append(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<Position>> {
        let queued = self.enqueue(topic, record);
        Box::pin(async move { queued.await?.await })
    }

    /// Read up to `max_records` records of `tp` starting at offset `from`. Offsets below the
    /// retention start are skipped (the result starts at the first retained record).
    fn fetch(&self, tp: &TopicPartition, from: u64, max_records: usize) -> BoxFuture<'static, Result<Fetched>>;

    /// Offset the next record of `tp` will get.
    fn end_offset(&self, tp: &TopicPartition) -> BoxFuture<'static, Result<u64>>;

    /// The core service's own time index, where it has one: the first offset of `tp` whose
    /// record time is at or after `time_ms` (the end offset when there is none). `None`: no
    /// index; [`offset_for_time`] then searches the log.
    fn time_index(&self, _tp: &TopicPartition, _time_ms: i64) -> Option<BoxFuture<'static, Result<u64>>> {
        None
    }

    /// A new live tail with nothing assigned.
    fn tail(&self) -> Box<dyn Tail>;

    /// Push instead of a tail, where the service can: every record of `tp` from the returned
    /// offset on is handed to `sink` when it becomes visible ([`LiveSink`]), with no task in
    /// between. `None`: this service does not push; tail the partition. Registering the same
    /// sink again changes nothing but the returned offset. The sink is held weakly.
    fn push_to(&self, _tp: &TopicPartition, _sink: std::sync::Weak<dyn LiveSink>) -> Option<Result<u64>> {
        None
    }

    /// Whether [`CoreService::group_tail`] is supported. Without consumer groups the router
    /// picks a member of a shared subscription among this gateway's sessions itself.
    fn has_consumer_groups(&self) -> bool {
        false
    }

    /// Join consumer group `group` reading `topic`. A group that is new starts at the end of
    /// the topic. Leaving the group = dropping the returned member.
    fn group_tail(&self, _group: &str, _topic: &str) -> Result<Box<dyn GroupTail>> {
        Err(BackendError::unavailable("this core service has no consumer groups"))
    }

    /// Write (Some) or delete (None) a key of a state store; resolves once durable.
    fn put_state(&self, store: StateStore, key: &str, value: Option<Bytes>) -> BoxFuture<'static, Result<()>>;

    /// Current value of a key.
    fn get_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>>;

    /// The value of a key in this gateway's view as it is now, without waiting for writes that
    /// other gateways made just before (a local read: no request to the core service). For
    /// values the caller knows from [`CoreService::watch_state`] updates, such as retained
    /// messages the router has indexed.
    fn peek_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>>;

    /// Up to `limit` entries of a store in key order, after key `after` (from the first with
    /// `None`): how a task visits every stored session without holding them all. A first page
    /// reflects every write made before the call; later pages continue from the view of the
    /// moment they are read.
    fn scan_state(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>>;

    /// All current entries of a store, then every later change (from any gateway instance),
    /// delivered to `updates` (bounded: a full channel delays the writer, it never drops).
    /// Returns the snapshot.
    fn watch_state(
        &self,
        store: StateStore,
        updates: tokio::sync::mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>>;

    /// Every later change of a store (from any gateway instance), delivered to `updates` like
    /// [`CoreService::watch_state`]'s, without a snapshot and without waiting for the view to
    /// catch up: for a caller that pages through the store itself with
    /// [`CoreService::scan_state`] (the router's retained index).
    fn follow_state(
        &self,
        store: StateStore,
        updates: tokio::sync::mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<()>> {
        let watch = self.watch_state(store, updates);
        Box::pin(async move { watch.await.map(drop) })
    }

    /// Write a client status event (connect / disconnect / tcpclean) to the events topic.
    fn emit_event(&self, event: ClientEvent) -> BoxFuture<'static, Result<()>>;

    /// False while the service cannot accept writes (for `/readyz`).
    fn is_available(&self) -> bool;

    /// Flush and stop; later calls fail with [`BackendError::Closed`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

pub type SharedCoreService = Arc<dyn CoreService>;

/// The page [`CoreService::scan_state`] returns from an in-memory map: up to `limit` entries
/// with keys after `after`, in key order.
pub fn scan_entries<'a>(
    entries: impl Iterator<Item = (&'a String, &'a Bytes)>,
    after: Option<&str>,
    limit: usize,
) -> Vec<(String, Bytes)> {
    let mut page: Vec<(&String, &Bytes)> = entries.filter(|(k, _)| after.is_none_or(|a| k.as_str() > a)).collect();
    if page.len() > limit {
        page.select_nth_unstable_by(limit, |a, b| a.0.cmp(b.0));
        page.truncate(limit);
    }
    page.sort_unstable_by(|a, b| a.0.cmp(b.0));
    page.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The first offset of `tp` whose record time is at or after `time_ms` (the end offset when
/// there is none): through the service's time index ([`CoreService::time_index`]) or by a
/// binary search of the log (one single-record read per step). Record times are set by their
/// producers, so they are ordered within a partition only up to the producers' clock skew:
/// callers widen their ranges by a margin and filter by time.
pub async fn offset_for_time(core: &dyn CoreService, tp: &TopicPartition, time_ms: i64) -> Result<u64> {
    if let Some(indexed) = core.time_index(tp, time_ms) {
        return indexed.await;
    }
    let first = core.fetch(tp, 0, 1).await?;
    let (mut lo, mut hi) = match first.records.first() {
        Some(r) => (r.offset, core.end_offset(tp).await?.max(r.offset)),
        None => return Ok(first.next_offset.max(first.high_watermark)),
    };
    // Invariant: every record below `lo` is older than `time_ms`; the record at `hi` (or the
    // end) is not.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let read = core.fetch(tp, mid, 1).await?;
        match read.records.first() {
            Some(r) if r.offset < hi && r.record.timestamp_ms < time_ms => lo = r.offset + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}
