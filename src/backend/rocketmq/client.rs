//! The RocketMQ client as the engine uses it: one producer, one classic pull consumer and the
//! route cache (topic → message queues), on a client runtime of bounded size.
//!
//! Threads: the client crate runs its network and timer tasks on a runtime it owns, built here
//! with `client_worker_threads` workers and `client_blocking_threads` blocking threads. Nothing
//! else in the gateway runs there. Retries: the producer's own retries are turned off (a send
//! names its queue, so a retry must not move it); [`super::writer`] retries on the same queue.
//!
//! Reconnection: each client instance (the producer's, the consumer's) stops admitting new
//! connections to a broker for 30 s once 5 attempts in a row have failed (the client's circuit
//! breaker), so after a broker outage the reads would resume up to 30 s after the broker is
//! back. A consumer whose pull cannot connect to a broker that accepts TCP connections is
//! therefore replaced by a new one, with fresh connections (see [`Client::pull`]).

#![allow(deprecated)] // The classic pull consumer is the client's by-offset read API.

use parking_lot::{Mutex, RwLock};
use rocketmq_client_rust::{
    ClientError, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, DefaultMQPullConsumer, MessageSelector,
    PullOptions, PullResult, PullStatus, SendStatus, TelemetryHandle,
};
use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendError, Result, TopicPartition};
use crate::config::RocketmqConfig;

/// Broker response code for a topic that does not exist.
const TOPIC_NOT_EXIST: i32 = 17;
/// Most messages one pull returns (the broker's own cap for memory reads is 32).
pub const PULL_MAX: i32 = 32;
/// Least time between two replacements of the pull consumer.
const CONSUMER_RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between two checks of whether a broker the consumer cannot reach is up.
const BROKER_PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub fn unavailable(what: impl Into<Cow<'static, str>>, e: &ClientError) -> BackendError {
    BackendError::unavailable_from(what, e.clone())
}

pub struct Client {
    pub config: RocketmqConfig,
    owner: Mutex<Option<RuntimeOwner>>,
    runtime: Arc<ClientRuntime>,
    producer: DefaultMQProducer,
    /// The pull consumer; replaced when it cannot connect to a broker that is up.
    consumer: RwLock<Arc<DefaultMQPullConsumer>>,
    /// When a broker was last probed and the consumer last replaced (serializes both).
    renewal: tokio::sync::Mutex<Renewal>,
    /// Message queues of each known topic, sorted by (broker, queue id): partition = index.
    routes: RwLock<HashMap<String, Arc<Vec<MessageQueue>>>>,
}

impl Client {
    pub async fn start(config: &RocketmqConfig) -> Result<Client> {
        let mut runtime_config = RuntimeConfig::for_parallelism("lmq-rocketmq", config.client_worker_threads.max(1));
        runtime_config.worker_threads = config.client_worker_threads.max(1);
        let runtime_config = runtime_config
            .with_max_blocking_threads(config.client_blocking_threads)
            .map_err(|e| BackendError::unavailable_from("rocketmq client runtime", e))?;
        let owner = RuntimeOwner::plan(runtime_config)
            .map_err(|e| BackendError::unavailable_from("rocketmq client runtime", e))?
            .build()
            .map_err(|e| BackendError::unavailable_from("rocketmq client runtime", e))?;
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig { shutdown_timeout: Duration::from_secs(10), ..Default::default() },
            TelemetryHandle::noop(),
        )
        .map_err(|e| unavailable("rocketmq client runtime", &e))?;
        let namesrv = config.namesrv();
        let timeout = u32::try_from(config.send_timeout_ms.max(1)).unwrap_or(u32::MAX);
        let mut producer = DefaultMQProducer::builder(runtime.clone())
            .producer_group(config.producer_group.as_str())
            .name_server_addr(namesrv.as_str())
            .send_msg_timeout(timeout)
            .retry_times_when_send_failed(0)
            .retry_times_when_send_async_failed(0)
            .create_topic_key(config.create_topic_key.as_str())
            .compress_msg_body_over_howmuch(u32::MAX)
            .build();
        producer.start().await.map_err(|e| unavailable("rocketmq producer start", &e))?;
        let consumer = start_consumer(config, &runtime).await?;
        Ok(Client {
            config: config.clone(),
            owner: Mutex::new(Some(owner)),
            runtime,
            producer,
            consumer: RwLock::new(Arc::new(consumer)),
            renewal: tokio::sync::Mutex::new(Renewal::default()),
            routes: RwLock::new(HashMap::new()),
        })
    }

    /// Cached queues of `topic`.
    pub fn cached(&self, topic: &str) -> Option<Arc<Vec<MessageQueue>>> {
        self.routes.read().get(topic).cloned()
    }

    /// Queues of `topic` from the name server (cached).
    pub async fn lookup(&self, topic: &str) -> Result<Arc<Vec<MessageQueue>>> {
        let mut producer = self.producer.clone();
        match producer.fetch_publish_message_queues(topic).await {
            Ok(mut queues) if !queues.is_empty() => {
                queues.sort_by(|a, b| (a.broker_name(), a.queue_id()).cmp(&(b.broker_name(), b.queue_id())));
                let queues = Arc::new(queues);
                self.routes.write().insert(topic.to_owned(), queues.clone());
                Ok(queues)
            }
            Ok(_) => Err(BackendError::unknown_topic(topic)),
            Err(e) if e.broker_response_code() == Some(TOPIC_NOT_EXIST) || is_no_route(&e) => {
                Err(BackendError::unknown_topic_from(topic, e))
            }
            Err(e) => Err(unavailable("rocketmq route lookup", &e)),
        }
    }

    /// Queues of `topic`, from the cache or the name server.
    pub async fn queues(&self, topic: &str) -> Result<Arc<Vec<MessageQueue>>> {
        match self.cached(topic) {
            Some(q) => Ok(q),
            None => self.lookup(topic).await,
        }
    }

    /// The message queue of a partition.
    pub async fn queue(&self, tp: &TopicPartition) -> Result<MessageQueue> {
        let queues = self.queues(&tp.topic).await?;
        queues.get(tp.partition as usize).cloned().ok_or_else(|| BackendError::unknown_topic(tp.to_string()))
    }

    /// Create `topic` with `partitions` queues on the brokers of the create-topic key, then wait
    /// until the name server routes it.
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let mut producer = self.producer.clone();
        let queue_num = i32::try_from(partitions.max(1)).unwrap_or(i32::MAX);
        producer
            .create_topic(&self.config.create_topic_key, topic, queue_num, HashMap::new())
            .await
            .map_err(|e| unavailable(format!("rocketmq create topic `{topic}`"), &e))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match self.lookup(topic).await {
                Ok(q) if q.len() >= partitions as usize => return Ok(()),
                Ok(_) | Err(BackendError::UnknownTopic { .. }) if tokio::time::Instant::now() < deadline => {}
                Ok(q) => {
                    return Err(BackendError::unavailable(format!(
                        "topic `{topic}` has {} queues, {partitions} requested",
                        q.len()
                    )))
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One synchronous send to `mq`; `Ok` only on SEND_OK, with the message's queue offset.
    pub async fn send(&self, mq: &MessageQueue, msg: Message) -> Result<u64> {
        let result = self
            .producer
            .send_to_queue_with_timeout(msg, mq.clone(), self.config.send_timeout_ms.max(1))
            .await
            .map_err(|e| unavailable("rocketmq send", &e))?;
        match result {
            Some(r) if r.send_status == SendStatus::SendOk => Ok(r.queue_offset),
            Some(r) => Err(BackendError::unavailable(format!("rocketmq send status {:?}", r.send_status))),
            None => Err(BackendError::unavailable("rocketmq send returned no result")),
        }
    }

    /// One synchronous send of a batch to `mq` (stored as consecutive messages); `Ok` only on
    /// SEND_OK, with the queue offset of the first message.
    pub async fn send_batch(&self, mq: &MessageQueue, msgs: Vec<Message>) -> Result<u64> {
        let r = self
            .producer
            .send_batch_to_queue_with_timeout(msgs, mq.clone(), self.config.send_timeout_ms.max(1))
            .await
            .map_err(|e| unavailable("rocketmq batch send", &e))?;
        if r.send_status == SendStatus::SendOk {
            Ok(r.queue_offset)
        } else {
            Err(BackendError::unavailable(format!("rocketmq send status {:?}", r.send_status)))
        }
    }

    /// Pull up to `max` messages of `mq` from `offset`; with `hold` the broker keeps the request
    /// up to that long while nothing is there (long polling). A pull that could not connect
    /// may replace the consumer ([`Client::renew_consumer`]); the caller retries as usual.
    pub async fn pull(&self, mq: &MessageQueue, offset: u64, max: i32, hold: Option<Duration>) -> Result<PullResult> {
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let mut options = PullOptions::new(mq.clone(), MessageSelector::by_tag("*"), offset, max.clamp(1, PULL_MAX))
            .map_err(|e| unavailable("rocketmq pull", &e))?;
        options = match hold {
            Some(hold) => {
                options.block_if_not_found(true).broker_suspend_timeout(hold).timeout(hold + Duration::from_secs(5))
            }
            None => options.timeout(Duration::from_secs(5)),
        };
        let consumer = self.consumer.read().clone();
        match consumer.pull_with_options(options).await {
            Ok(r) => Ok(r),
            Err(e) => {
                if is_connection_failure(&e) {
                    self.renew_consumer(&consumer, mq).await;
                }
                Err(unavailable("rocketmq pull", &e))
            }
        }
    }

    /// Replace `failed` (the consumer a pull of `mq` could not connect with) by a new consumer,
    /// with fresh connections, if the broker of `mq` accepts TCP connections: the consumer's
    /// client then refuses to connect only because of earlier failures. Does nothing when the
    /// broker is still away, when another pull replaced the consumer already, within
    /// [`BROKER_PROBE_INTERVAL`] of the last probe or [`CONSUMER_RENEW_INTERVAL`] of the last
    /// replacement, or once the client is shut down.
    async fn renew_consumer(&self, failed: &Arc<DefaultMQPullConsumer>, mq: &MessageQueue) {
        let mut renewal = self.renewal.lock().await;
        let current = self.consumer.read().clone();
        let recent = |at: Option<Instant>, interval: Duration| at.is_some_and(|at| at.elapsed() < interval);
        if renewal.closed
            || !Arc::ptr_eq(&current, failed)
            || recent(renewal.probed, BROKER_PROBE_INTERVAL)
            || recent(renewal.renewed, CONSUMER_RENEW_INTERVAL)
        {
            return;
        }
        renewal.probed = Some(Instant::now());
        let Some(addr) = self.broker_addr(mq) else { return };
        let connect = tokio::net::TcpStream::connect(addr.as_str());
        if !matches!(tokio::time::timeout(Duration::from_secs(1), connect).await, Ok(Ok(_))) {
            return;
        }
        renewal.renewed = Some(Instant::now());
        match start_consumer(&self.config, &self.runtime).await {
            Ok(consumer) => {
                *self.consumer.write() = Arc::new(consumer);
                tracing::info!(broker = %addr, "rocketmq pull consumer replaced: its client refused to connect to a broker that is up");
                if let Err(e) = current.shutdown().await {
                    tracing::debug!(error = %e, "replaced rocketmq pull consumer shutdown");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "rocketmq pull consumer not replaced; a later failed pull tries again")
            }
        }
    }

    /// Address of the master broker of `mq`, as the producer's routes know it.
    fn broker_addr(&self, mq: &MessageQueue) -> Option<String> {
        let instance = self.producer.default_mq_producer_impl()?.get_mq_client_factory().ok()?;
        instance.find_broker_address_in_publish(mq.broker_name()).map(|a| a.to_string())
    }

    /// Offset the next message of `mq` will get.
    pub async fn max_offset(&self, mq: &MessageQueue) -> Result<u64> {
        let mut producer = self.producer.clone();
        let max = producer.max_offset(mq).await.map_err(|e| unavailable("rocketmq max offset", &e))?;
        Ok(u64::try_from(max).unwrap_or(0))
    }

    /// The broker's time index: the offset of the first message of `mq` stored at or after
    /// `time_ms` (the end of the queue when there is none).
    pub async fn search_offset(&self, mq: &MessageQueue, time_ms: i64) -> Result<u64> {
        let mut producer = self.producer.clone();
        let t = u64::try_from(time_ms).unwrap_or(0);
        let found = producer.search_offset(mq, t).await.map_err(|e| unavailable("rocketmq search offset", &e))?;
        Ok(u64::try_from(found).unwrap_or(0))
    }

    /// Stop the producer, the consumer and the client runtime.
    pub async fn shutdown(&self) {
        let mut producer = self.producer.clone();
        producer.shutdown().await;
        // No replacement after this one is shut down (one in progress finishes first).
        self.renewal.lock().await.closed = true;
        let consumer = self.consumer.read().clone();
        if let Err(e) = consumer.shutdown().await {
            tracing::debug!(error = %e, "rocketmq pull consumer shutdown");
        }
        let _ = self.runtime.shutdown().await;
        let owner = self.owner.lock().take();
        if let Some(owner) = owner {
            let _ = owner.shutdown_tasks().await;
            // The owner's runtime must not be dropped on an async thread.
            let _ = std::thread::spawn(move || drop(owner.shutdown_background())).join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.lock().take() {
            std::thread::spawn(move || drop(owner.shutdown_background()));
        }
    }
}

/// Times of the last broker probe and of the last consumer replacement.
#[derive(Default)]
struct Renewal {
    probed: Option<Instant>,
    renewed: Option<Instant>,
    /// The client is shut down: the consumer is never replaced again.
    closed: bool,
}

/// The classic pull consumer of the gateway's reads (by queue and offset, no subscription).
async fn start_consumer(config: &RocketmqConfig, runtime: &Arc<ClientRuntime>) -> Result<DefaultMQPullConsumer> {
    let namesrv = config.namesrv();
    let suspend = Duration::from_millis(config.poll_suspend_ms.max(1));
    let consumer = DefaultMQPullConsumer::builder(runtime.clone())
        .consumer_group(config.consumer_group.as_str())
        .name_server_addr(namesrv.as_str())
        .broker_suspend_max_time(suspend)
        .consumer_timeout_when_suspend(suspend + Duration::from_secs(5))
        .consumer_pull_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| unavailable("rocketmq pull consumer", &e))?;
    consumer.start().await.map_err(|e| unavailable("rocketmq pull consumer start", &e))?;
    Ok(consumer)
}

/// Whether a request failed because no connection to its broker could be made (refused, or not
/// admitted by the client's circuit breaker).
fn is_connection_failure(e: &ClientError) -> bool {
    e.to_string().starts_with("transport.connection.failed")
}

/// Whether a route lookup failed because the topic has no route (the client reports a missing
/// route as an invalid argument, with the text redacted).
fn is_no_route(e: &ClientError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.starts_with("core.argument.invalid") || text.contains("no route") || text.contains("not exist")
}

/// Whether a pull found messages.
pub fn found(r: &PullResult) -> bool {
    matches!(r.pull_status(), PullStatus::Found)
}
