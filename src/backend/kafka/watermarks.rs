//! End offsets (high watermarks) of partitions, asked of the brokers once for all who need
//! them at the same time.
//!
//! A read-your-writes read (`get_state`: a returning session's CONNECT) first asks for the
//! end of its partition. Asked one request per caller, a burst of 50 reconnecting clients sent
//! 50 ListOffsets requests down one broker connection, which the broker answers one after the
//! other: the 50th waited for all the others (p50 75 ms per answer in the reconnect
//! benchmark). Here, per partition, at most one request is in flight and at most one more is
//! queued behind it: a caller joins the queued request, or queues one when only the running
//! request exists (that request may have been sent before the caller's own writes were
//! acknowledged, so its answer may be too old), or sends one when there is none. Every caller
//! still gets an end read *after* its call began.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::backend::{BackendError, Result};

/// An error shared by every caller of one request (`BackendError` cannot be cloned).
type SharedError = Arc<dyn std::error::Error + Send + Sync>;
type Answer = Shared<BoxFuture<'static, std::result::Result<i64, SharedError>>>;

/// The requests of one partition: the one in flight and the one queued behind it, each with
/// an id so that a finished request can tell whether it is still the running one.
#[derive(Default)]
struct Partition {
    running: Option<(u64, Answer)>,
    queued: Option<(u64, Answer)>,
}

#[derive(Default)]
pub(super) struct Watermarks {
    partitions: parking_lot::Mutex<HashMap<(String, i32), Partition>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Watermarks {
    /// The end offset of `topic`/`partition`, read after this call: `query` asks the brokers
    /// (a blocking call, run on the blocking pool).
    pub(super) fn end(
        self: &Arc<Self>,
        topic: &str,
        partition: i32,
        query: impl Fn() -> Result<i64> + Send + Sync + 'static,
    ) -> BoxFuture<'static, Result<i64>> {
        let answer = {
            let mut partitions = self.partitions.lock();
            let p = partitions.entry((topic.to_owned(), partition)).or_default();
            match (&p.running, &p.queued) {
                (_, Some((_, queued))) => queued.clone(),
                (running, None) => {
                    let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let before = running.as_ref().map(|(_, r)| r.clone());
                    let answer = request(Arc::downgrade(self), (topic.to_owned(), partition), id, before, query);
                    if p.running.is_none() {
                        p.running = Some((id, answer.clone()));
                    } else {
                        p.queued = Some((id, answer.clone()));
                    }
                    answer
                }
            }
        };
        Box::pin(async move { answer.await.map_err(|e| BackendError::unavailable_from("", e)) })
    }

    /// Request `id` has its answer: the queued request (if any) becomes the running one.
    fn finished(&self, key: &(String, i32), id: u64) {
        let mut partitions = self.partitions.lock();
        let Some(p) = partitions.get_mut(key) else { return };
        if p.running.as_ref().is_some_and(|(r, _)| *r == id) {
            p.running = p.queued.take();
        }
        if p.running.is_none() {
            partitions.remove(key);
        }
    }
}

/// A request sent once `before` (the running request) has its answer.
fn request(
    owner: Weak<Watermarks>,
    key: (String, i32),
    id: u64,
    before: Option<Answer>,
    query: impl Fn() -> Result<i64> + Send + Sync + 'static,
) -> Answer {
    async move {
        if let Some(before) = before {
            let _ = before.await;
        }
        let answer = match tokio::task::spawn_blocking(query).await {
            Ok(Ok(end)) => Ok(end),
            Ok(Err(e)) => Err(Arc::new(e) as SharedError),
            Err(e) => Err(Arc::new(e) as SharedError),
        };
        if let Some(owner) = owner.upgrade() {
            owner.finished(&key, id);
        }
        answer
    }
    .boxed()
    .shared()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::time::Duration;

    /// A burst of callers shares requests, and each gets an end read after its call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_share_requests_and_each_sees_writes_made_before_its_call() {
        let marks = Arc::new(Watermarks::default());
        let end = Arc::new(AtomicI64::new(0));
        let asked = Arc::new(AtomicUsize::new(0));
        let query = {
            let (end, asked) = (end.clone(), asked.clone());
            move || {
                asked.fetch_add(1, Ordering::SeqCst);
                let seen = end.load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                Ok(seen)
            }
        };
        let query = Arc::new(query);
        let mut calls = Vec::new();
        for i in 0..50 {
            // A write acknowledged just before the call.
            end.store(i + 1, Ordering::SeqCst);
            let q = query.clone();
            let answer = marks.end("t", 0, move || q());
            calls.push(tokio::spawn(async move { (i + 1, answer.await) }));
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }
        for call in calls {
            let (written, answer) = call.await.unwrap();
            assert!(answer.unwrap() >= written, "an end read after the call");
        }
        let asked = asked.load(Ordering::SeqCst);
        assert!(asked < 20, "{asked} requests for 50 callers");
        assert!(marks.partitions.lock().is_empty(), "nothing left behind");
    }
}
