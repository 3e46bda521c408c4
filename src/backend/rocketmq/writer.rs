//! One writer task per message queue: a bounded FIFO of records, sent one at a time with a
//! synchronous send, each acknowledged only on the broker's SEND_OK.
//!
//! One send in flight per queue is what keeps a publisher's order: the queue offset of a record
//! is fixed by the broker when it stores it, so a later record must not be sent before the
//! earlier one is stored. A failed attempt is retried on the same queue (`send_retries` more
//! times, pausing 100 ms × attempt); then the record fails and its publisher is never
//! acknowledged. A timed-out attempt may still have been stored, so a retry can store a record
//! twice (at least once, never lost).

use rocketmq_model::common::message::message_queue::MessageQueue;
use rocketmq_model::common::message::message_single::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::client::Client;
use crate::backend::{BackendError, Position, Result};

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
        while let Some(req) = rx.recv().await {
            let mut attempt = 0;
            let result = loop {
                match client.send(&mq, req.msg.clone()).await {
                    Ok(offset) => {
                        healthy.store(true, Ordering::Release);
                        on_stored(partition, offset);
                        break Ok(Position { partition, offset });
                    }
                    Err(e) if attempt < retries => {
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
            // The appender may have given up waiting; the record is stored (or failed) anyway.
            let _ = req.done.send(result);
        }
    });
    (tx, task)
}

/// The error for a writer that is gone.
pub fn closed() -> BackendError {
    BackendError::Closed
}
