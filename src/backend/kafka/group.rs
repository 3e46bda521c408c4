//! Consumer-group members (shared subscriptions spread across gateways): a consumer that
//! `subscribe`s, with offsets stored when the router has handed a record on and committed
//! in the background by librdkafka.

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client;
use crate::backend::{BackendError, GroupTail, Record, Result, TopicPartition};
use crate::config::KafkaConfig;

const POLL_MAX_RECORDS: usize = 256;

pub(super) struct KafkaGroupTail {
    /// `Option` only so that `drop` can hand the consumer to a thread: leaving a group
    /// blocks while the final commit and the leave request complete.
    consumer: Option<StreamConsumer>,
    topic: Arc<str>,
    closed: Arc<AtomicBool>,
    last_error_log: Option<Instant>,
}

impl KafkaGroupTail {
    pub(super) fn join(cfg: &KafkaConfig, group_id: &str, topic: &str, closed: Arc<AtomicBool>) -> Result<Self> {
        let mut config = client::consumer(cfg);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest");
        let consumer: StreamConsumer = config.create().map_err(client::error)?;
        consumer.subscribe(&[topic]).map_err(client::error)?;
        Ok(KafkaGroupTail { consumer: Some(consumer), topic: topic.into(), closed, last_error_log: None })
    }
}

impl GroupTail for KafkaGroupTail {
    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>> {
        Box::pin(async move {
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return Err(BackendError::Closed);
                }
                let Some(consumer) = &self.consumer else { return Err(BackendError::Closed) };
                let mut out = Vec::new();
                let mut failure = None;
                match consumer.recv().await {
                    Ok(m) => out.push(self.record(&m)),
                    Err(e) => failure = Some(e),
                }
                while failure.is_none() && out.len() < POLL_MAX_RECORDS {
                    match consumer.recv().now_or_never() {
                        Some(Ok(m)) => out.push(self.record(&m)),
                        Some(Err(e)) => failure = Some(e),
                        None => break,
                    }
                }
                if let Some(e) = failure {
                    let now = Instant::now();
                    if self.last_error_log.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
                        self.last_error_log = Some(now);
                        tracing::warn!(topic = %self.topic, error = %e, "Kafka consumer group: error (retrying)");
                    }
                    if out.is_empty() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                if !out.is_empty() {
                    return Ok(out);
                }
            }
        })
    }

    fn done(&mut self, record: &Record) {
        let Some(consumer) = &self.consumer else { return };
        let partition = i32::try_from(record.tp.partition).unwrap_or(i32::MAX);
        let next = i64::try_from(record.offset + 1).unwrap_or(i64::MAX);
        if let Err(e) = consumer.store_offset(&record.tp.topic, partition, next) {
            tracing::debug!(partition = %record.tp, error = %e, "Kafka consumer group: offset not stored (partition revoked?)");
        }
    }
}

impl KafkaGroupTail {
    fn record(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Arc<Record> {
        let topic = if m.topic() == &*self.topic { self.topic.clone() } else { Arc::from(m.topic()) };
        client::record(TopicPartition { topic, partition: u32::try_from(m.partition()).unwrap_or(0) }, m)
    }
}

impl Drop for KafkaGroupTail {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            std::thread::spawn(move || drop(consumer));
        }
    }
}
