//! The live tail on Kafka: a consumer with manual, incremental assignment.

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client;
use crate::backend::{BackendError, Record, Result, Tail, TopicPartition};

/// Most records one `poll` returns.
const POLL_MAX_RECORDS: usize = 1024;

pub(super) struct KafkaTail {
    consumer: Result<StreamConsumer, KafkaError>,
    closed: Arc<AtomicBool>,
    /// Next offset to hand out, per assigned partition; a message below it (a re-read across a
    /// re-assignment) or of a partition no longer assigned is skipped.
    assigned: HashMap<Arc<str>, HashMap<i32, u64>>,
    last_error_log: Option<Instant>,
}

impl KafkaTail {
    pub(super) fn new(consumer: Result<StreamConsumer, KafkaError>, closed: Arc<AtomicBool>) -> Self {
        KafkaTail { consumer, closed, assigned: HashMap::new(), last_error_log: None }
    }

    fn partition_list(tp: &TopicPartition, offset: Option<u64>) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        let partition = i32::try_from(tp.partition).unwrap_or(i32::MAX);
        let offset = offset.map(|o| Offset::Offset(i64::try_from(o).unwrap_or(i64::MAX))).unwrap_or(Offset::Invalid);
        // Adding one partition to a fresh list cannot fail.
        let _ = list.add_partition_offset(&tp.topic, partition, offset);
        list
    }
}

/// Accept a consumed message if its partition is assigned and it is not a repeat.
fn accept(
    assigned: &mut HashMap<Arc<str>, HashMap<i32, u64>>,
    m: &rdkafka::message::BorrowedMessage<'_>,
    out: &mut Vec<Arc<Record>>,
) {
    use rdkafka::message::Message;
    let Some((topic, _)) = assigned.get_key_value(m.topic()) else { return };
    let topic = topic.clone();
    let partition = m.partition();
    let Some(next) = assigned.get_mut(m.topic()).and_then(|p| p.get_mut(&partition)) else { return };
    let offset = u64::try_from(m.offset()).unwrap_or(0);
    if offset < *next {
        return;
    }
    *next = offset + 1;
    let tp = TopicPartition { topic, partition: u32::try_from(partition).unwrap_or(0) };
    out.push(client::record(tp, m));
}

impl Tail for KafkaTail {
    fn assign(&mut self, tp: TopicPartition, from: u64) {
        let Ok(consumer) = &self.consumer else { return };
        let partition = i32::try_from(tp.partition).unwrap_or(i32::MAX);
        let already = self.assigned.get(&tp.topic).is_some_and(|p| p.contains_key(&partition));
        if already {
            if let Err(e) = consumer.incremental_unassign(&Self::partition_list(&tp, None)) {
                tracing::warn!(partition = %tp, error = %e, "Kafka tail: cannot unassign");
            }
        }
        if let Err(e) = consumer.incremental_assign(&Self::partition_list(&tp, Some(from))) {
            tracing::warn!(partition = %tp, error = %e, "Kafka tail: cannot assign");
            return;
        }
        self.assigned.entry(tp.topic.clone()).or_default().insert(partition, from);
    }

    fn unassign(&mut self, tp: &TopicPartition) {
        let Ok(consumer) = &self.consumer else { return };
        let partition = i32::try_from(tp.partition).unwrap_or(i32::MAX);
        let Some(parts) = self.assigned.get_mut(&tp.topic) else { return };
        if parts.remove(&partition).is_none() {
            return;
        }
        if parts.is_empty() {
            self.assigned.remove(&tp.topic);
        }
        if let Err(e) = consumer.incremental_unassign(&Self::partition_list(tp, None)) {
            tracing::warn!(partition = %tp, error = %e, "Kafka tail: cannot unassign");
        }
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>> {
        Box::pin(async move {
            loop {
                if self.closed.load(Ordering::Acquire) {
                    return Err(BackendError::Closed);
                }
                let consumer = match &self.consumer {
                    Ok(c) => c,
                    Err(e) => return Err(BackendError::unavailable_from("", e.clone())),
                };
                // Awaiting the first message is cancel-safe (nothing is taken from the queue
                // until it is returned); the rest are taken without waiting.
                let mut out = Vec::new();
                let first = consumer.recv().await;
                let mut pending = Vec::new();
                let mut failure = None;
                match first {
                    Ok(m) => pending.push(m),
                    Err(e) => failure = Some(e),
                }
                while failure.is_none() && pending.len() < POLL_MAX_RECORDS {
                    match consumer.recv().now_or_never() {
                        Some(Ok(m)) => pending.push(m),
                        Some(Err(e)) => failure = Some(e),
                        None => break,
                    }
                }
                for m in &pending {
                    accept(&mut self.assigned, m, &mut out);
                }
                drop(pending);
                if let Some(e) = failure {
                    let now = Instant::now();
                    if self.last_error_log.is_none_or(|t| now.duration_since(t) > Duration::from_secs(10)) {
                        self.last_error_log = Some(now);
                        tracing::warn!(error = %e, "Kafka tail: consumer error (retrying)");
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
}
