//! One-shot reads from a position (catch-up of lagging and returning sessions): a small pool
//! of consumers, each assigned to one partition at the requested offset for one read.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use super::client;
use crate::backend::{BackendError, Fetched, Result, TopicPartition};

/// Consumers kept for reads; more concurrent reads wait for one.
const READERS: usize = 16;
/// Longest one read waits for records it knows exist.
const READ_WAIT: Duration = Duration::from_secs(5);

pub(super) struct Readers {
    config: ClientConfig,
    idle: parking_lot::Mutex<Vec<StreamConsumer>>,
    permits: Semaphore,
}

impl Readers {
    pub(super) fn new(config: ClientConfig) -> Arc<Readers> {
        Arc::new(Readers { config, idle: parking_lot::Mutex::new(Vec::new()), permits: Semaphore::new(READERS) })
    }

    /// Read up to `max` records of `tp` from `from`; `high_watermark` is the partition's end,
    /// already known to be above `from`.
    pub(super) async fn read(
        &self,
        tp: &TopicPartition,
        from: u64,
        max: usize,
        high_watermark: u64,
    ) -> Result<Fetched> {
        let _permit = self.permits.acquire().await.map_err(|_| BackendError::Closed)?;
        let idle = self.idle.lock().pop();
        let consumer = match idle {
            Some(c) => c,
            None => self.config.create::<StreamConsumer>().map_err(client::error)?,
        };
        // A read given up half-way (its future dropped) hands the consumer back too.
        let mut lent = Lent { readers: self, consumer: Some(consumer) };
        let Some(consumer) = lent.consumer.as_ref() else { return Err(BackendError::Closed) };
        let partition = i32::try_from(tp.partition).unwrap_or(i32::MAX);
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&tp.topic, partition, Offset::Offset(i64::try_from(from).unwrap_or(i64::MAX)))
            .map_err(client::error)?;
        consumer.assign(&list).map_err(client::error)?;
        drop(list);
        let mut records = Vec::new();
        let mut next_offset = from;
        let deadline = tokio::time::Instant::now() + READ_WAIT;
        let mut failed = None;
        while records.len() < max && next_offset < high_watermark {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    failed = Some(e);
                    break;
                }
                Ok(Ok(m)) => {
                    let offset = u64::try_from(m.offset()).unwrap_or(0);
                    if m.topic() != &*tp.topic || m.partition() != partition || offset < next_offset {
                        continue;
                    }
                    next_offset = offset + 1;
                    records.push(client::record(tp.clone(), &m));
                }
            }
        }
        // Reuse the consumer only when it is known to be healthy.
        if failed.is_some() {
            lent.consumer = None;
        }
        drop(lent);
        if let Some(e) = failed {
            if records.is_empty() {
                return Err(client::error(e));
            }
        }
        Ok(Fetched { records, next_offset, high_watermark })
    }

    /// Kafka's time index (`offsetsForTimes`): the first offset of `tp` whose timestamp is at
    /// or after `time_ms`, or the end of the partition when there is none.
    pub(super) async fn offset_for_time(self: Arc<Self>, tp: TopicPartition, time_ms: i64) -> Result<u64> {
        let _permit = self.permits.acquire().await.map_err(|_| BackendError::Closed)?;
        let idle = self.idle.lock().pop();
        let consumer = match idle {
            Some(c) => c,
            None => self.config.create::<StreamConsumer>().map_err(client::error)?,
        };
        let readers = self.clone();
        tokio::task::spawn_blocking(move || {
            let partition = i32::try_from(tp.partition).unwrap_or(i32::MAX);
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&tp.topic, partition, Offset::Offset(time_ms.max(0))).map_err(client::error)?;
            let found = consumer.offsets_for_times(list, READ_WAIT).map_err(client::error)?;
            let offset = match found.find_partition(&tp.topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => u64::try_from(o).unwrap_or(0),
                _ => {
                    let (_, high) =
                        consumer.fetch_watermarks(&tp.topic, partition, READ_WAIT).map_err(client::error)?;
                    u64::try_from(high).unwrap_or(0)
                }
            };
            readers.idle.lock().push(consumer);
            Ok(offset)
        })
        .await
        .map_err(|e| BackendError::unavailable_from("Kafka offset lookup task failed", e))?
    }
}

/// A pooled consumer out for one read: back to the pool when the read ends or is dropped
/// (unassigned; a consumer that cannot be unassigned is closed instead).
struct Lent<'a> {
    readers: &'a Readers,
    consumer: Option<StreamConsumer>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            if consumer.unassign().is_ok() {
                self.readers.idle.lock().push(consumer);
            }
        }
    }
}
