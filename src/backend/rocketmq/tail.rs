//! The live tail: one puller task per assigned partition long-polls its message queue from
//! the assigned offset and hands batches to the tail over a bounded channel (a slow reader
//! delays the pullers; nothing is dropped). Each assignment has a generation, so batches of an
//! earlier assignment of the same partition (still in the channel) are discarded.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::client::{self, Client};
use super::record::from_message;
use crate::backend::{BackendError, Record, Result, Tail, TopicPartition};
use rocketmq_client_rust::PullStatus;

/// Batches buffered between the pullers and the reader of one tail.
const TAIL_CHANNEL: usize = 16;

struct Batch {
    tp: TopicPartition,
    generation: u64,
    records: Vec<Arc<Record>>,
}

pub struct RocketmqTail {
    client: Arc<Client>,
    closed: CancellationToken,
    tx: mpsc::Sender<Batch>,
    rx: mpsc::Receiver<Batch>,
    /// Generation and puller of each assigned partition.
    assigned: HashMap<TopicPartition, (u64, tokio::task::JoinHandle<()>)>,
    next_generation: u64,
}

impl RocketmqTail {
    pub fn new(client: Arc<Client>, closed: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(TAIL_CHANNEL);
        RocketmqTail { client, closed, tx, rx, assigned: HashMap::new(), next_generation: 1 }
    }
}

/// Read `tp` from `from` on until the service closes, sending every batch found to `tx`.
async fn pull_loop(
    client: Arc<Client>,
    closed: CancellationToken,
    tp: TopicPartition,
    generation: u64,
    from: u64,
    tx: mpsc::Sender<Batch>,
) {
    let hold = Duration::from_millis(client.config.poll_suspend_ms.max(1));
    let mut next = from;
    while !closed.is_cancelled() {
        let mq = match client.queue(&tp).await {
            Ok(mq) => mq,
            Err(_) => {
                // Not created yet (or the name server is away): look again later.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = client.lookup(&tp.topic).await;
                continue;
            }
        };
        let started = Instant::now();
        let pulled = tokio::select! {
            r = client.pull(&mq, next, client::PULL_MAX, Some(hold)) => r,
            _ = closed.cancelled() => return,
        };
        match pulled {
            Ok(r) => match r.pull_status() {
                PullStatus::Found => {
                    let records: Vec<Arc<Record>> = r
                        .msg_found_list()
                        .unwrap_or_default()
                        .iter()
                        .filter(|m| u64::try_from(m.queue_offset()).is_ok_and(|o| o >= next))
                        .map(|m| {
                            Arc::new(Record {
                                tp: tp.clone(),
                                offset: u64::try_from(m.queue_offset()).unwrap_or(0),
                                record: from_message(m),
                            })
                        })
                        .collect();
                    next = r.next_begin_offset().max(next);
                    if !records.is_empty() && tx.send(Batch { tp: tp.clone(), generation, records }).await.is_err() {
                        return;
                    }
                }
                PullStatus::NoMatchedMsg => next = r.next_begin_offset().max(next),
                PullStatus::NoNewMsg => {
                    // A broker that does not hold the request: do not spin.
                    if started.elapsed() < hold / 2 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                PullStatus::OffsetIllegal => {
                    if next < r.min_offset() {
                        next = r.min_offset();
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            },
            Err(e) => {
                tracing::debug!(partition = %tp, error = %e, "rocketmq tail pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

impl Tail for RocketmqTail {
    fn assign(&mut self, tp: TopicPartition, from: u64) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let puller = pull_loop(self.client.clone(), self.closed.clone(), tp.clone(), generation, from, self.tx.clone());
        let task = tokio::spawn(puller);
        if let Some((_, old)) = self.assigned.insert(tp, (generation, task)) {
            old.abort();
        }
    }

    fn unassign(&mut self, tp: &TopicPartition) {
        if let Some((_, task)) = self.assigned.remove(tp) {
            task.abort();
        }
    }

    fn poll(&mut self) -> BoxFuture<'_, Result<Vec<Arc<Record>>>> {
        Box::pin(async move {
            loop {
                if self.closed.is_cancelled() {
                    return Err(BackendError::Closed);
                }
                let batch = tokio::select! {
                    b = self.rx.recv() => b,
                    _ = self.closed.cancelled() => return Err(BackendError::Closed),
                };
                let Some(batch) = batch else { return Err(BackendError::Closed) };
                if self.assigned.get(&batch.tp).is_some_and(|(g, _)| *g == batch.generation) {
                    return Ok(batch.records);
                }
            }
        })
    }
}

impl Drop for RocketmqTail {
    fn drop(&mut self) {
        for (_, (_, task)) in self.assigned.drain() {
            task.abort();
        }
    }
}
