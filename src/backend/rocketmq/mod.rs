//! The RocketMQ core service: the gateway's topics, records and state on a RocketMQ cluster,
//! spoken to with the classic remoting protocol of Apache RocketMQ 4.x/5.x brokers (the tests
//! run Apache RocketMQ 5.5.0), through the `rocketmq-client-rust` crate.
//!
//! Mapping (see ARCHITECTURE.md, "RocketMQ core service"):
//! - topic → RocketMQ topic; partition → message queue (queues sorted by broker name, queue
//!   id; partition = index); offset → queue offset.
//! - record → message ([`record`]): body = value, `KEYS` = key, LMQ headers as user
//!   properties, tag = the MQTT topic's second level (else `default_tag`).
//! - append → [`writer`]: synchronous send to the partition's queue, acknowledged on SEND_OK.
//! - fetch / end offset / tail → classic pull by queue offset ([`tail`]: long polling).
//! - state stores → the state topic replayed into memory ([`state`]).
//! - events → the events topic with the event type as tag and the LMQ JSON body.
//!
//! What it must not do: keep anything in the gateway that another gateway needs; acknowledge
//! before SEND_OK; create topics other than through `ensure_topic` (and the state and events
//! topics at start).

mod client;
mod record;
mod state;
mod tail;
mod writer;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::client::Client;
use self::state::StateView;
use self::writer::SendReq;
use super::{
    AppendAck, BackendError, CoreRecord, CoreService, Fetched, Record, Result, StateStore, StateUpdate, Tail,
    TopicPartition,
};
use crate::backend::diskstate::DiskState;
use crate::config::RocketmqConfig;
use crate::events::ClientEvent;

pub use self::record::{from_message, tag_for, to_message, ENVELOPE};

/// How long `put_state` / `get_state` wait for the state view.
const STATE_WAIT: Duration = Duration::from_secs(10);
/// How long a read waits for a record this gateway saw acknowledged to become readable
/// (brokers index a stored message into its queue shortly after SEND_OK).
const VISIBLE_WAIT: Duration = Duration::from_secs(2);

/// FNV-1a, 32 bit: the same key → partition rule as the embedded engine.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

struct Shared {
    client: Arc<Client>,
    config: RocketmqConfig,
    events_topic: String,
    state: Arc<StateView>,
    closed: CancellationToken,
    healthy: Arc<AtomicBool>,
    /// Writer of each (topic, partition).
    writers: Mutex<HashMap<TopicPartition, mpsc::Sender<SendReq>>>,
    writer_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// End of each partition as acknowledged to this gateway (reads wait for the broker's index).
    acked_end: Arc<Mutex<HashMap<TopicPartition, u64>>>,
    round_robin: AtomicU32,
}

/// The RocketMQ core service. Create with [`RocketmqCore::open`].
pub struct RocketmqCore {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    shutdown_lock: tokio::sync::Mutex<()>,
    /// The temporary directory of the state copy when `state_cache_dir` is unset (removed
    /// with the core).
    _state_dir: Option<tempfile::TempDir>,
}

impl RocketmqCore {
    /// Connect to the cluster, make sure the events and state topics exist, and load the state.
    pub async fn open(config: &RocketmqConfig, events_topic: &str) -> Result<Arc<RocketmqCore>> {
        let client = Arc::new(Client::start(config).await?);
        for (topic, queues) in [(events_topic, 1), (config.state_topic.as_str(), 1)] {
            match client.lookup(topic).await {
                Ok(_) => {}
                Err(BackendError::UnknownTopic { .. }) => client.create_topic(topic, queues).await?,
                Err(e) => return Err(e),
            }
        }
        let healthy = Arc::new(AtomicBool::new(true));
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
        let source = format!("rocketmq:{}/{}", config.namesrv(), config.state_topic);
        let file = tokio::task::spawn_blocking(move || DiskState::open(&state_dir, &source))
            .await
            .map_err(|e| BackendError::storage_from("state cache: open task failed", e))??;
        let state = StateView::new(client.clone(), &config.state_topic, healthy.clone(), file)?;
        let shared = Arc::new(Shared {
            client,
            config: config.clone(),
            events_topic: events_topic.to_owned(),
            state: state.clone(),
            closed: CancellationToken::new(),
            healthy,
            writers: Mutex::new(HashMap::new()),
            writer_tasks: Mutex::new(Vec::new()),
            acked_end: Arc::new(Mutex::new(HashMap::new())),
            round_robin: AtomicU32::new(0),
        });
        let core = Arc::new(RocketmqCore {
            shared: shared.clone(),
            tasks: Mutex::new(Vec::new()),
            shutdown_lock: tokio::sync::Mutex::new(()),
            _state_dir: temporary,
        });
        core.tasks.lock().push(tokio::spawn(state.clone().run(shared.closed.clone())));
        core.tasks.lock().push(tokio::spawn(refresh_loop(Arc::downgrade(&shared))));
        // Reads wait for the copy to catch up (each `get_state` to the queue's end then), so
        // the gateway does not wait here for the whole state topic.
        tracing::info!(namesrv = %config.namesrv(), "rocketmq core service ready");
        Ok(core)
    }
}

/// Rewrite state entries before the broker's retention can remove their records.
async fn refresh_loop(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let closed = s.closed.clone();
        let age_ms = i64::try_from(s.config.state_refresh_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
        let mut after = None;
        'pass: loop {
            let (stale, next) = match s.state.stale(after.take(), age_ms).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "state refresh: cannot read the copy; next round retries");
                    break;
                }
            };
            for (store, key, value, offset) in stale {
                let rec = state::change_record(store, &key, Some(value), Some(offset));
                if let Err(e) = s.append(&s.config.state_topic, rec).await {
                    tracing::warn!(error = %e, "state refresh failed; next round retries");
                    break 'pass;
                }
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        drop(s);
        tokio::select! {
            _ = tokio::time::sleep(state::refresh_period()) => {}
            _ = closed.cancelled() => return,
        }
    }
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if self.closed.is_cancelled() {
            Err(BackendError::Closed)
        } else {
            Ok(())
        }
    }

    /// The writer of `tp` (started on first use).
    fn writer(
        self: &Arc<Self>,
        tp: &TopicPartition,
        mq: &rocketmq_model::common::message::message_queue::MessageQueue,
    ) -> mpsc::Sender<SendReq> {
        let mut writers = self.writers.lock();
        if let Some(w) = writers.get(tp) {
            return w.clone();
        }
        let acked = self.acked_end.clone();
        let topic = tp.topic.clone();
        let on_stored = Arc::new(move |partition: u32, offset: u64| {
            let mut acked = acked.lock();
            let end = acked.entry(TopicPartition { topic: topic.clone(), partition }).or_insert(0);
            *end = (*end).max(offset + 1);
        });
        let (tx, task) = writer::spawn(
            self.client.clone(),
            mq.clone(),
            tp.partition,
            self.config.queue_capacity,
            self.healthy.clone(),
            on_stored,
        );
        writers.insert(tp.clone(), tx.clone());
        self.writer_tasks.lock().push(task);
        tx
    }

    async fn enqueue(self: &Arc<Self>, topic: &str, record: CoreRecord) -> Result<AppendAck> {
        self.check_open()?;
        let queues = self.client.queues(topic).await?;
        let n = queues.len() as u32;
        let partition = match &record.key {
            // The state view follows queue 0 only (one total order of changes), whatever the
            // number of queues the state topic was given.
            _ if topic == self.config.state_topic => 0,
            Some(key) => fnv1a(key) % n,
            None => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
        };
        let mq = queues.get(partition as usize).ok_or_else(|| BackendError::unknown_topic(topic))?;
        let tag = if topic == self.events_topic {
            record
                .header(crate::events::TYPE_HEADER)
                .and_then(|t| std::str::from_utf8(t).ok())
                .unwrap_or("event")
                .to_owned()
        } else if topic == self.config.state_topic {
            record.header("lmqStateStore").and_then(|t| std::str::from_utf8(t).ok()).unwrap_or("state").to_owned()
        } else {
            record::tag_for(&record, &self.config.default_tag)
        };
        let msg = record::to_message(topic, &record, &tag);
        let tp = TopicPartition::new(topic, partition);
        let writer = self.writer(&tp, mq);
        let (done, rx) = oneshot::channel();
        // The writer's queue is FIFO: once `send` returns, the record's place is fixed.
        writer.send(SendReq { msg, done }).await.map_err(|_| writer::closed())?;
        Ok(Box::pin(async move { rx.await.map_err(|_| BackendError::Closed)? }) as AppendAck)
    }

    async fn append(self: &Arc<Self>, topic: &str, record: CoreRecord) -> Result<super::Position> {
        self.enqueue(topic, record).await?.await
    }

    fn acked_end(&self, tp: &TopicPartition) -> u64 {
        self.acked_end.lock().get(tp).copied().unwrap_or(0)
    }

    async fn fetch(&self, tp: &TopicPartition, from: u64, max_records: usize) -> Result<Fetched> {
        self.check_open()?;
        let mq = self.client.queue(tp).await?;
        let max = i32::try_from(max_records.clamp(1, client::PULL_MAX as usize)).unwrap_or(client::PULL_MAX);
        let deadline = tokio::time::Instant::now() + VISIBLE_WAIT;
        let mut from_now = from;
        loop {
            let r = self.client.pull(&mq, from_now, max, None).await?;
            let hwm = r.max_offset().max(self.acked_end(tp));
            if client::found(&r) {
                let records: Vec<Arc<Record>> = r
                    .msg_found_list()
                    .unwrap_or_default()
                    .iter()
                    .filter(|m| u64::try_from(m.queue_offset()).is_ok_and(|o| o >= from_now))
                    .map(|m| {
                        Arc::new(Record {
                            tp: tp.clone(),
                            offset: u64::try_from(m.queue_offset()).unwrap_or(0),
                            record: record::from_message(m),
                        })
                    })
                    .collect();
                let next = r.next_begin_offset().max(from_now);
                return Ok(Fetched { records, next_offset: next, high_watermark: hwm.max(next) });
            }
            if from_now < r.min_offset() {
                // Below the oldest retained message: read from there.
                from_now = r.min_offset();
                continue;
            }
            if from_now < self.acked_end(tp) && tokio::time::Instant::now() < deadline {
                // Acknowledged here, not yet indexed by the broker.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            if matches!(r.pull_status(), rocketmq_client_rust::PullStatus::NoMatchedMsg) {
                from_now = r.next_begin_offset().max(from_now);
            }
            return Ok(Fetched { records: Vec::new(), next_offset: from_now, high_watermark: hwm });
        }
    }
}

impl CoreService for RocketmqCore {
    fn kind(&self) -> &'static str {
        "rocketmq"
    }

    fn ensure_topic(&self, topic: &str, partitions: u32) -> BoxFuture<'_, Result<()>> {
        let topic = topic.to_owned();
        Box::pin(async move {
            self.shared.check_open()?;
            match self.shared.client.lookup(&topic).await {
                // An existing topic keeps its queues (fewer than asked is fine: ordering by key
                // still holds; more partitions is an operator's decision on RocketMQ).
                Ok(_) => Ok(()),
                Err(BackendError::UnknownTopic { .. }) => self.shared.client.create_topic(&topic, partitions).await,
                Err(e) => Err(e),
            }
        })
    }

    fn partitions(&self, topic: &str) -> Result<u32> {
        self.shared.check_open()?;
        self.shared.client.cached(topic).map(|q| q.len() as u32).ok_or_else(|| BackendError::unknown_topic(topic))
    }

    fn enqueue(&self, topic: &str, record: CoreRecord) -> BoxFuture<'static, Result<AppendAck>> {
        let shared = self.shared.clone();
        let topic = topic.to_owned();
        Box::pin(async move { shared.enqueue(&topic, record).await })
    }

    fn fetch(&self, tp: &TopicPartition, from: u64, max_records: usize) -> BoxFuture<'static, Result<Fetched>> {
        let shared = self.shared.clone();
        let tp = tp.clone();
        Box::pin(async move { shared.fetch(&tp, from, max_records).await })
    }

    fn end_offset(&self, tp: &TopicPartition) -> BoxFuture<'static, Result<u64>> {
        let shared = self.shared.clone();
        let tp = tp.clone();
        Box::pin(async move {
            shared.check_open()?;
            let mq = shared.client.queue(&tp).await?;
            Ok(shared.client.max_offset(&mq).await?.max(shared.acked_end(&tp)))
        })
    }

    fn time_index(&self, tp: &TopicPartition, time_ms: i64) -> Option<BoxFuture<'static, Result<u64>>> {
        let shared = self.shared.clone();
        let tp = tp.clone();
        Some(Box::pin(async move {
            shared.check_open()?;
            let mq = shared.client.queue(&tp).await?;
            shared.client.search_offset(&mq, time_ms).await
        }))
    }

    fn tail(&self) -> Box<dyn Tail> {
        Box::new(tail::RocketmqTail::new(self.shared.client.clone(), self.shared.closed.clone()))
    }

    fn put_state(&self, store: StateStore, key: &str, value: Option<Bytes>) -> BoxFuture<'static, Result<()>> {
        let shared = self.shared.clone();
        let rec = state::change_record(store, key, value, None);
        Box::pin(async move {
            let pos = shared.append(&shared.config.state_topic, rec).await?;
            shared.state.wait_applied(pos.offset + 1, STATE_WAIT).await
        })
    }

    fn get_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        let shared = self.shared.clone();
        let key = key.to_owned();
        Box::pin(async move {
            shared.check_open()?;
            shared.state.catch_up(STATE_WAIT).await?;
            shared.state.get(store, &key).await
        })
    }

    fn peek_state(&self, store: StateStore, key: &str) -> BoxFuture<'static, Result<Option<Bytes>>> {
        let shared = self.shared.clone();
        let key = key.to_owned();
        Box::pin(async move {
            shared.check_open()?;
            shared.state.get(store, &key).await
        })
    }

    fn scan_state(
        &self,
        store: StateStore,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared.check_open()?;
            if after.is_none() {
                shared.state.catch_up(STATE_WAIT).await?;
            }
            shared.state.scan(store, after, limit).await
        })
    }

    fn watch_state(
        &self,
        store: StateStore,
        updates: mpsc::Sender<StateUpdate>,
    ) -> BoxFuture<'static, Result<Vec<(String, Bytes)>>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared.check_open()?;
            shared.state.catch_up(STATE_WAIT).await?;
            shared.state.watch(store, updates).await
        })
    }

    fn follow_state(&self, store: StateStore, updates: mpsc::Sender<StateUpdate>) -> BoxFuture<'static, Result<()>> {
        let followed = self.shared.check_open().map(|()| self.shared.state.follow(store, updates));
        Box::pin(async move { followed })
    }

    fn emit_event(&self, event: ClientEvent) -> BoxFuture<'static, Result<()>> {
        // Headers become user properties (`eventType`, the gateway marker `lmqGateway`); the
        // tag is the event type (`enqueue`).
        let record = event.to_record();
        let shared = self.shared.clone();
        Box::pin(async move { shared.append(&shared.events_topic, record).await.map(|_| ()) })
    }

    fn is_available(&self) -> bool {
        !self.shared.closed.is_cancelled() && self.shared.healthy.load(Ordering::Acquire)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _guard = self.shutdown_lock.lock().await;
            if self.shared.closed.is_cancelled() {
                return;
            }
            self.shared.closed.cancel();
            // Writers finish what is queued (each send is bounded by the send timeout and retries).
            self.shared.writers.lock().clear();
            let writer_tasks: Vec<_> = std::mem::take(&mut *self.shared.writer_tasks.lock());
            let drain = futures::future::join_all(writer_tasks);
            if tokio::time::timeout(Duration::from_secs(30), drain).await.is_err() {
                tracing::warn!("rocketmq writers did not drain within 30 s");
            }
            for t in std::mem::take(&mut *self.tasks.lock()) {
                t.abort();
            }
            self.shared.client.shutdown().await;
            self.shared.state.close();
            tracing::info!("rocketmq core service stopped");
        })
    }
}

impl Drop for RocketmqCore {
    fn drop(&mut self) {
        self.shared.closed.cancel();
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}
