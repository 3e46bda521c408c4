//! One writer task per message queue: a bounded FIFO of records, sent with synchronous sends,
//! each acknowledged only on the broker's SEND_OK.
//!
//! One send in flight per queue is what keeps a publisher's order: the queue offset of a record
//! is fixed by the broker when it stores it, so a later record must not be sent before the
//! earlier one is stored. Whatever is queued while a send is in flight goes out next as one
//! batch (up to [`BATCH_MAX`] messages / [`BATCH_BYTES`]), which the broker stores as
//! consecutive messages of the queue: one round trip for many publishes under load. A failed
//! attempt is retried on the same queue (`send_retries` more times, pausing 100 ms × attempt);
//! then its records fail and their publishers are never acknowledged. A timed-out attempt may
//! still have been stored, so a retry can store records twice (at least once, never lost).

use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::client::Client;
use crate::backend::{BackendError, Position, Result};

/// Most messages sent in one batch.
pub const BATCH_MAX: usize = 64;
/// Payload bytes after which a batch is closed (the broker's limit for a whole batch is 4 MiB).
pub const BATCH_BYTES: usize = 1024 * 1024;

pub struct SendReq {
    pub msg: Message,
    pub done: oneshot::Sender<Result<Position>>,
}

/// Start the writer of `mq` (partition `partition`); it ends when every sender is dropped,
/// after sending what is queued.
pub fn spawn(
    client: Arc<Client>,
    mq: MessageQueue,
    partition: u32,
    capacity: usize,
    healthy: Arc<AtomicBool>,
    on_stored: Arc<dyn Fn(u32, u64) + Send + Sync>,
) -> (mpsc::Sender<SendReq>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<SendReq>(capacity.max(1));
    let task = tokio::spawn(async move {
        let retries = client.config.send_retries;
        while let Some(first) = rx.recv().await {
            let mut bytes = first.msg.body_slice().len();
            let mut reqs = vec![first];
            while reqs.len() < BATCH_MAX && bytes < BATCH_BYTES {
                let Ok(req) = rx.try_recv() else { break };
                bytes += req.msg.body_slice().len();
                reqs.push(req);
            }
            let count = reqs.len() as u64;
            let mut attempt = 0;
            let result = loop {
                let sent = if reqs.len() == 1 {
                    client.send(&mq, reqs[0].msg.clone()).await
                } else {
                    client.send_batch(&mq, reqs.iter().map(|r| r.msg.clone()).collect()).await
                };
                match sent {
                    Ok(offset) => {
                        healthy.store(true, Ordering::Release);
                        on_stored(partition, offset + count - 1);
                        break Ok(offset);
                    }
                    Err(e) if attempt < retries && e.is_retriable() => {
                        attempt += 1;
                        tracing::warn!(queue = %mq, attempt, error = %e, "rocketmq send failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                    Err(e) => {
                        healthy.store(false, Ordering::Release);
                        tracing::warn!(queue = %mq, error = %e, "rocketmq send failed");
                        break Err(e);
                    }
                }
            };
            // An appender may have given up waiting; its record is stored (or failed) anyway.
            // Each gets the failure as an `Unavailable` around the shared error.
            let result = result.map_err(Arc::new);
            for (i, req) in reqs.into_iter().enumerate() {
                let position = match &result {
                    Ok(first) => Ok(Position { partition, offset: first + i as u64 }),
                    Err(e) => Err(BackendError::unavailable_from("", Arc::clone(e))),
                };
                let _ = req.done.send(position);
            }
        }
    });
    (tx, task)
}

/// The error for a writer that is gone.
pub fn closed() -> BackendError {
    BackendError::Closed
}
