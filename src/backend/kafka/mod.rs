//! The Kafka core service (`core.kind: kafka`), on librdkafka through `rdkafka`.
//!
//! - Appends: one idempotent `acks=all` producer per gateway. `enqueue` hands the record to
//!   librdkafka (its place in the partition's order is fixed then; a full producer queue is
//!   waited out — back-pressure) and the acknowledgement is the delivery report, when it gives
//!   the record's offset (see [`stored_at`]).
//! - Live tail: a consumer with manual assignment per `tail()` (`tail.rs`).
//! - One-shot reads: a pool of consumers (`fetch.rs`).
//! - State stores: compacted topics, materialised in memory on every gateway (`state.rs`).
//! - Events: records in the events topic, key = ClientId, header `eventType`.
//!
//! Nothing here is specific to a broker implementation: topics are created through the admin
//! API with standard configs, and the clients use only public Kafka protocol features.

mod client;
mod fetch;
mod group;
mod state;
mod tail;
mod watermarks;

pub use client::key_partition;

use bytes::Bytes;
use futures::future::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::backend::diskstate::DiskState;
use crate::backend::{
    AppendAck, BackendError, CoreRecord, CoreService, Fetched, GroupTail, Position, Result, StateStore, StateUpdate,
    Tail, TopicPartition,
};
use crate::config::KafkaConfig;
use crate::events::ClientEvent;

/// Timeout of one metadata / watermark request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a state read waits for the view to catch up with the brokers.
const STATE_CATCH_UP: Duration = Duration::from_secs(10);
/// Interval of the availability probe.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Records the state consumer fetches ahead of the copies, KiB.
const STATE_PREFETCH_KBYTES: usize = 32_768;

/// What the brokers say of one topic.
struct TopicInfo {
    partitions: u32,
    /// Fewest replicas of any of its partitions.
    replicas: usize,
    /// Every partition has a leader (a topic just created has none for a moment).
    led: bool,
}

/// Why [`KafkaCore::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A librdkafka client could not be created (its configuration is refused).
    #[error("Kafka client: {0}")]
    Client(#[from] KafkaError),
    /// Gateway topics are missing and `create_topics` is off.
    #[error(
        "Kafka topics missing: {} (create them — the state topics with cleanup.policy=compact — \
         or set core.kafka.create_topics: true)",
        .0.join(", ")
    )]
    TopicsMissing(Vec<String>),
    #[error(transparent)]
    Core(#[from] BackendError),
}

pub struct KafkaCore {
    config: KafkaConfig,
    events_topic: String,
    producer: Arc<ProducerSlot>,
    admin: AdminClient<DefaultClientContext>,
    /// Partition count of every topic known to exist.
    partitions: parking_lot::RwLock<HashMap<String, u32>>,
    state: Arc<state::StateView>,
    /// The temporary directory of the sessions file when `state_cache_dir` is unset (removed
    /// with the core).
    _state_dir: Option<tempfile::TempDir>,
    readers: Arc<fetch::Readers>,
    watermarks: Arc<watermarks::Watermarks>,
    available: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl KafkaCore {
    /// Connect (waiting, with a log line per attempt, while the cluster is unreachable),
    /// create or check the gateway's topics and load the state stores.
    pub async fn open(config: &KafkaConfig, events_topic: &str) -> std::result::Result<Arc<KafkaCore>, OpenError> {
        let producer = Arc::new(ProducerSlot {
            current: parking_lot::RwLock::new(client::producer(config).create()?),
            config: client::producer(config),
        });
        let admin: AdminClient<DefaultClientContext> = client::producer(config).create()?;
        let consumer_config = client::consumer(config);
        // Checks the consumer settings once, so later `tail()` calls cannot fail on them.
        drop(consumer_config.create::<StreamConsumer>()?);
        // The state consumer's prefetch is bounded well below librdkafka's default (64 MiB):
        // while a cold copy is filled, the disk is slower than the fetches and the queue of
        // fetched records ahead of it was most of the gateway's memory.
        let state_consumer: StreamConsumer = consumer_config
            .clone()
            .set("queued.max.messages.kbytes", STATE_PREFETCH_KBYTES.to_string())
            .set("fetch.max.bytes", (STATE_PREFETCH_KBYTES * 1024 / 2).to_string())
            .create()?;
        let (state_dir, temporary) = match &config.state_cache_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("lmq-state-")
                    .tempdir()
                    .map_err(|e| BackendError::storage_from("state cache", e))?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let topics = &config.state_topics;
        let sources =
            [("sessions", &topics.sessions), ("retained", &topics.retained), ("credentials", &topics.credentials)]
                .map(|(dir, topic)| (state_dir.join(dir), format!("kafka:{}/{topic}", config.bootstrap_servers)));
        let disk = tokio::task::spawn_blocking(move || -> Result<Vec<DiskState>> {
            sources.iter().map(|(dir, source)| DiskState::open(dir, source)).collect()
        })
        .await
        .map_err(|e| BackendError::storage_from("state cache: open task failed", e))??;
        let core = Arc::new(KafkaCore {
            config: config.clone(),
            events_topic: events_topic.to_owned(),
            producer,
            admin,
            partitions: parking_lot::RwLock::new(HashMap::new()),
            state: state::StateView::new(&config.state_topics, disk)?,
            _state_dir: temporary,
            readers: fetch::Readers::new(consumer_config.clone().set("fetch.wait.max.ms", "10").to_owned()),
            watermarks: Arc::default(),
            available: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            tasks: parking_lot::Mutex::new(Vec::new()),
        });
        core.wait_for_cluster().await;
        core.ensure_gateway_topics().await?;
        for store in state::DISK_STORES {
            core.state.check_disk(store, &core.end_offsets(core.state.topic(store)).await?)?;
        }
        core.state.assign(&state_consumer, &core.partitions.read())?;
        core.tasks.lock().push(tokio::spawn(core.state.clone().run(state_consumer)));
        // Sessions are read when their clients come back, each waiting only for its own
        // partition, and the router indexes retained messages in the background while
        // connections are accepted (SUBSCRIBEs wait for it): the gateway does not wait here
        // for the whole fleet's disk stores.
        for store in StateStore::ALL.into_iter().filter(|s| !state::DISK_STORES.contains(s)) {
            core.catch_up(store).await?;
        }
        core.available.store(true, Ordering::Release);
        core.tasks.lock().push(tokio::spawn(probe(Arc::downgrade(&core))));
        tracing::info!(bootstrap = config.bootstrap_servers, "Kafka core service ready");
        Ok(core)
    }

    async fn wait_for_cluster(&self) {
        let mut attempt = 0u32;
        loop {
            match self.metadata(None).await {
                Ok(_) => return,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(
                        bootstrap = self.config.bootstrap_servers,
                        attempt,
                        error = %e,
                        "waiting for Kafka: cluster unreachable, retrying in 2 s"
                    );
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
            }
        }
    }

    /// Topic name → partition count and fewest replicas of a partition, from the brokers.
    async fn metadata(&self, topic: Option<&str>) -> Result<HashMap<String, TopicInfo>> {
        let producer = self.producer.get();
        let topic = topic.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let md = producer.client().fetch_metadata(topic.as_deref(), REQUEST_TIMEOUT).map_err(client::error)?;
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| {
                    let replicas = t.partitions().iter().map(|p| p.replicas().len()).min().unwrap_or(0);
                    let led = t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none());
                    (t.name().to_owned(), TopicInfo { partitions: t.partitions().len() as u32, replicas, led })
                })
                .collect())
        })
        .await
        .map_err(|e| BackendError::unavailable_from("Kafka metadata task failed", e))?
    }

    /// The events topic and the compacted state topics: created if missing (when allowed),
    /// otherwise the start fails naming the missing ones.
    async fn ensure_gateway_topics(&self) -> std::result::Result<(), OpenError> {
        let existing = self.metadata(None).await?;
        let mut wanted: Vec<(String, bool)> = vec![(self.events_topic.clone(), false)];
        wanted.extend(StateStore::ALL.iter().map(|s| (self.state.topic(*s).to_owned(), true)));
        let missing: Vec<&(String, bool)> = wanted.iter().filter(|(t, _)| !existing.contains_key(t)).collect();
        if !missing.is_empty() && !self.config.create_topics {
            return Err(OpenError::TopicsMissing(missing.iter().map(|(t, _)| t.clone()).collect()));
        }
        for (topic, compacted) in missing {
            self.create_topic(topic, self.config.partitions, (*compacted, None)).await?;
        }
        for (topic, _) in &wanted {
            self.learn_partitions(topic).await?;
        }
        Ok(())
    }

    /// Make sure `topic` exists (created with `retention_ms` when given) and learn its partitions.
    async fn ensure(&self, topic: &str, partitions: u32, retention_ms: Option<u64>) -> Result<()> {
        self.check_open()?;
        if self.partitions.read().contains_key(topic) {
            return Ok(());
        }
        if !self.metadata(Some(topic)).await?.contains_key(topic) {
            if !self.config.create_topics {
                return Err(BackendError::unknown_topic(topic));
            }
            self.create_topic(topic, partitions, (false, retention_ms)).await?;
        }
        self.learn_partitions(topic).await.map(|_| ())
    }

    async fn create_topic(
        &self,
        topic: &str,
        partitions: u32,
        (compacted, retention_ms): (bool, Option<u64>),
    ) -> Result<()> {
        let mut new = NewTopic::new(
            topic,
            i32::try_from(partitions).unwrap_or(i32::MAX),
            TopicReplication::Fixed(self.config.replication_factor),
        );
        if compacted {
            new = new.set("cleanup.policy", "compact");
        }
        let retention = retention_ms.map(|ms| ms.to_string());
        if let Some(ms) = &retention {
            new = new.set("retention.ms", ms);
        }
        let min_isr = self.config.min_insync_replicas.map(|n| n.to_string());
        if let Some(min_isr) = &min_isr {
            new = new.set("min.insync.replicas", min_isr);
        }
        let opts = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let results = self.admin.create_topics([&new], &opts).await.map_err(client::error)?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic, partitions, compacted, "created Kafka topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(BackendError::unavailable_from(format!("cannot create Kafka topic `{t}`"), code));
                }
            }
        }
        Ok(())
    }

    /// Wait until the brokers report the topic with a leader for every partition, and
    /// remember its partition count. A topic with a partition of a single replica is named in a
    /// warning once: what the gateway acknowledges into it is then one broker's copy.
    async fn learn_partitions(&self, topic: &str) -> Result<u32> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let found = self.metadata(Some(topic)).await?.remove(topic);
            // Past the deadline a partition without a leader is taken as it is: reads and
            // writes retry on their own until one is elected.
            if let Some(info) = found.filter(|i| i.led || tokio::time::Instant::now() > deadline) {
                let new = self.partitions.write().insert(topic.to_owned(), info.partitions).is_none();
                if new && info.replicas == 1 {
                    tracing::warn!(
                        topic,
                        "Kafka topic has replication factor 1: an acknowledged message is stored on one broker \
                         only and is lost with that broker's disk (set core.kafka.replication_factor >= 3 and \
                         min_insync_replicas >= 2 in production)"
                    );
                }
                return Ok(info.partitions);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BackendError::unknown_topic(topic));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Current end offsets of every partition of a topic.
    fn end_offsets(&self, topic: &str) -> BoxFuture<'static, Result<Vec<(i32, i64)>>> {
        let Some(n) = self.partitions.read().get(topic).copied() else {
            let unknown = BackendError::unknown_topic(topic);
            return Box::pin(async move { Err(unknown) });
        };
        let ends: Vec<_> = (0..n as i32).map(|p| self.high_watermark(topic, p)).collect();
        Box::pin(async move {
            let ends = futures::future::join_all(ends).await;
            ends.into_iter().enumerate().map(|(p, end)| Ok((p as i32, end?))).collect()
        })
    }

    /// The end offset of a partition, read after this call (one request for all who ask at
    /// the same time, see [`watermarks`]).
    fn high_watermark(&self, topic: &str, partition: i32) -> BoxFuture<'static, Result<i64>> {
        let producer = self.producer.get();
        let owned = topic.to_owned();
        self.watermarks.end(topic, partition, move || {
            client::high_watermark(producer.client(), &owned, partition, REQUEST_TIMEOUT)
        })
    }

    /// Wait until the state view holds everything written to `store` before this call.
    async fn catch_up(&self, store: StateStore) -> Result<()> {
        let ends = self.end_offsets(self.state.topic(store)).await?;
        self.state.wait_for(store, &ends, STATE_CATCH_UP).await
    }

    /// The partition of a state topic that holds `key` (chosen by the gateway, see
    /// [`client::key_partition`]).
    fn state_partition(&self, topic: &str, key: &str) -> u32 {
        let n = self.partitions.read().get(topic).copied().unwrap_or(1);
        client::key_partition(key.as_bytes(), n)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    /// Hand a record to librdkafka, waiting while its queue is full.
    fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: Option<Bytes>,
        value: Option<Bytes>,
        headers: Option<rdkafka::message::OwnedHeaders>,
        timestamp_ms: Option<i64>,
    ) -> BoxFuture<'static, Result<AppendAck>> {
        let slot = self.producer.clone();
        let producer = slot.get();
        let closed = self.closed.clone();
        let available = self.available.clone();
        let topic = topic.to_owned();
        Box::pin(async move {
            let mut backoff = Duration::from_millis(1);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic);
            if let Some(k) = &key {
                record = record.key(&k[..]);
            }
            if let Some(v) = &value {
                record = record.payload(&v[..]);
            }
            if let Some(h) = headers {
                record = record.headers(h);
            }
            if let Some(ts) = timestamp_ms {
                record = record.timestamp(ts);
            }
            if let Some(p) = partition {
                record = record.partition(i32::try_from(p).unwrap_or(i32::MAX));
            }
            loop {
                if closed.load(Ordering::Acquire) {
                    return Err(BackendError::Closed);
                }
                match producer.send_result(record) {
                    Ok(delivery) => {
                        let slot = slot.clone();
                        let used = producer.clone();
                        let topic = topic.clone();
                        let ack: AppendAck = Box::pin(async move {
                            match delivery.await {
                                Ok(Ok(d)) => {
                                    let position = stored_at(&d);
                                    if position.is_some() {
                                        available.store(true, Ordering::Release);
                                    } else {
                                        tracing::warn!(
                                            topic,
                                            partition = d.partition,
                                            "Kafka producer reported a record delivered without its offset (inferred \
                                             from a later batch, not confirmed by the broker): not acknowledged"
                                        );
                                    }
                                    position.ok_or_else(|| {
                                        BackendError::unavailable(
                                            "Kafka did not confirm the record: delivery inferred, no offset",
                                        )
                                    })
                                }
                                Ok(Err((e, _))) => {
                                    slot.renew_if_fatal(&used);
                                    Err(client::error(e))
                                }
                                Err(_) => Err(BackendError::Closed),
                            }
                        });
                        return Ok(ack);
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // Back-pressure: the publisher's socket is not read while we wait.
                        record = returned;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(50));
                    }
                    Err((e, _)) => return Err(client::error(e)),
                }
            }
        })
    }
}

/// Where a delivery report says the record is, when the broker said so: `None` for a report
/// without an offset. librdkafka's idempotent producer reports a record as delivered without
/// the broker's word when a later batch of the same partition is stored while the record's
/// own batch was refused with a retriable error, taking the later success as proof of the
/// earlier batch ("implicit ack"). A broker that holds no sequence state for the producer on
/// that partition (a partition just created, or the producer's state there expired) accepts
/// the later batch all the same, so the record is then not in the log: such a report is not
/// an acknowledgement.
fn stored_at(d: &rdkafka::producer::future_producer::Delivery) -> Option<Position> {
    Some(Position { partition: u32::try_from(d.partition).ok()?, offset: u64::try_from(d.offset).ok()? })
}

/// The gateway's producer, replaced when librdkafka declares it failed for good (a fatal
/// idempotence error, e.g. fenced or out-of-order sequence): the records it still held fail
/// (never acknowledged) and later appends go through a new producer instead of failing until
/// a restart.
struct ProducerSlot {
    current: parking_lot::RwLock<FutureProducer>,
    config: rdkafka::config::ClientConfig,
}

impl ProducerSlot {
    fn get(&self) -> FutureProducer {
        self.current.read().clone()
    }

    fn renew_if_fatal(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else { return };
        let mut current = self.current.write();
        if current.client().native_ptr() != failed.client().native_ptr() {
            return; // already replaced
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::error!(%code, reason, "Kafka producer failed for good; replaced by a new one");
                let old = std::mem::replace(&mut *current, fresh);
                // Dropping a producer purges and flushes for up to 500 ms: not on a runtime thread.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => {
                tracing::error!(%code, reason, error = %e, "Kafka producer failed for good and cannot be replaced")
            }
        }
    }
}

/// Keep `available` true only while the cluster answers metadata requests.
async fn probe(core: std::sync::Weak<KafkaCore>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(core) = core.upgrade() else { return };
        if core.closed.load(Ordering::Acquire) {
            return;
        }
        let ok = core.metadata(Some(&core.events_topic)).await.is_ok();
        let was = core.available.swap(ok, Ordering::AcqRel);
        if was && !ok {
            tracing::warn!(bootstrap = core.config.bootstrap_servers, "Kafka unreachable: not ready");
        } else if !was && ok {
            tracing::info!(bootstrap = core.config.bootstrap_servers, "Kafka reachable again");
        }
    }
}

impl CoreService for KafkaCore {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn ensure_topic(&self, topic: &str, partitions: u32) -> BoxFuture<'_, Result<()>> {
        let topic = topic.to_owned();
        Box::pin(async move { self.ensure(&topic, partitions, None).await })
    }

    fn ensure_topic_with_retention(
        &self,
        topic: &str,
        partitions: u32,
        retention_ms: u64,
    ) -> BoxFuture<'_, Result<()>> {
        let topic = topic.to_owned();
        Box::pin(async move { self.ensure(&topic, partitions, Some(retention_ms)).await })
    }

    fn partitions(&self, topic: &str) -> Result<u32> {
        self.partitions.read().get(topic).copied().ok_or_else(|| BackendError::unknown_topic(topic))
    }

    fn enqueue(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<AppendAck>> {
        // librdkafka would hold a record for an unknown topic until its timeout; callers
        // `ensure_topic` first, so an unknown topic here is refused at once.
        if !self.partitions.read().contains_key(topic) {
            let topic = topic.to_owned();
            return Box::pin(async move { Err(BackendError::unknown_topic(topic)) });
        }
        let headers = client::headers(&record);
        self.produce(topic, None, record.key, Some(record.value), Some(headers), Some(record.timestamp_ms))
    }

    fn fetch(&self, tp: &TopicPartition, from: u64, max_records: usize) -> BoxFuture<'static, Result<Fetched>> {
        let end = self.end_offset(tp);
        let readers = self.readers.clone();
        let tp = tp.clone();
        Box::pin(async move {
            let high_watermark = end.await?;
            if from >= high_watermark || max_records == 0 {
                return Ok(Fetched { records: Vec::new(), next_offset: from, high_watermark });
            }
            readers.read(&tp, from, max_records, high_watermark).await
        })
    }

    fn end_offset(&self, tp: &TopicPartition) -> BoxFuture<'static, Result<u64>> {
        let open = self.check_open().and_then(|()| self.partitions(&tp.topic).map(|_| ()));
        let high = self.high_watermark(&tp.topic, i32::try_from(tp.partition).unwrap_or(i32::MAX));
        Box::pin(async move {
            open?;
            Ok(u64::try_from(high.await?).unwrap_or(0))
        })
    }

    fn time_index(&self, tp: &TopicPartition, time_ms: i64) -> Option<BoxFuture<'static, Result<u64>>> {
        let readers = self.readers.clone();
        let tp = tp.clone();
        let open = self.check_open().and_then(|()| self.partitions(&tp.topic).map(|_| ()));
        Some(Box::pin(async move {
            open?;
            readers.offset_for_time(tp, time_ms).await
        }))
    }

    fn tail(&self) -> Box<dyn Tail> {
        let consumer = client::consumer(&self.config).create::<StreamConsumer>();
        Box::new(tail::KafkaTail::new(consumer, self.closed.clone()))
    }

    fn has_consumer_groups(&self) -> bool {
        true
    }

    fn group_tail(&self, group: &str, topic: &str) -> Result<Box<dyn GroupTail>> {
        self.check_open()?;
        // One Kafka consumer group per share group and topic, the same on every gateway.
        let group_id = format!("lmq-share.{group}.{topic}");
        Ok(Box::new(group::KafkaGroupTail::join(&self.config, &group_id, topic, self.closed.clone())?))
    }

    fn put_state(&self, store: StateStore, key: &str, value: Option<Bytes>) -> BoxFuture<'static, Result<()>> {
        let topic = self.state.topic(store);
        let partition = self.state_partition(topic, key);
        let queued = self.produce(topic, Some(partition), Some(Bytes::from(key.to_owned())), value, None, None);
        Box::pin(async move { queued.await?.await.map(|_| ()) })
    }

    fn get_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        let topic = self.state.topic(store);
        let partition = self.state_partition(topic, key);
        let end = self.end_offset(&TopicPartition::new(topic, partition));
        let state = self.state.clone();
        let key = key.to_owned();
        let open = self.check_open();
        Box::pin(async move {
            open?;
            let end = i64::try_from(end.await?).unwrap_or(i64::MAX);
            let p = i32::try_from(partition).unwrap_or(i32::MAX);
            state.wait_for(store, &[(p, end)], STATE_CATCH_UP).await?;
            state.get(store, &key).await
        })
    }

    fn watch_state(
        &self,
        store: StateStore,
        updates: mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let ends = self.end_offsets(self.state.topic(store));
        let state = self.state.clone();
        let open = self.check_open();
        Box::pin(async move {
            open?;
            state.wait_for(store, &ends.await?, STATE_CATCH_UP).await?;
            state.watch(store, updates).await
        })
    }

    fn follow_state(&self, store: StateStore, updates: mpsc::Sender<StateUpdate>) -> BoxFuture<'static, Result<()>> {
        self.state.follow(store, updates);
        let open = self.check_open();
        Box::pin(async move { open })
    }

    fn peek_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        let state = self.state.clone();
        let key = key.to_owned();
        let open = self.check_open();
        Box::pin(async move {
            open?;
            state.get(store, &key).await
        })
    }

    fn scan_state(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let ends = after.is_none().then(|| self.end_offsets(self.state.topic(store)));
        let state = self.state.clone();
        let open = self.check_open();
        Box::pin(async move {
            open?;
            if let Some(ends) = ends {
                state.wait_for(store, &ends.await?, STATE_CATCH_UP).await?;
            }
            state.scan(store, after, limit).await
        })
    }

    fn emit_event(&self, event: ClientEvent) -> BoxFuture<'static, Result<()>> {
        let fut = self.append(&self.events_topic, event.to_record());
        Box::pin(async move { fut.await.map(|_| ()) })
    }

    fn is_available(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.available.load(Ordering::Acquire)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            let producer = self.producer.get();
            let flushed = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "Kafka producer: records still queued at shutdown");
            }
            for t in self.tasks.lock().drain(..) {
                t.abort();
            }
            let state = self.state.clone();
            let _ = tokio::task::spawn_blocking(move || state.close()).await;
        })
    }
}
