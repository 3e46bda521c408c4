//! A session's delivery queue: bounded, filled by the router without waiting, emptied by
//! the session's connection.
//!
//! It allocates nothing until the first delivery and gives its memory back once drained, so
//! the queue of an idle connection costs a few words (a channel of the async runtime keeps its
//! block of slots allocated for as long as it lives: 800 bytes per connection in heaptrack,
//! plus the channel's shared state).

use parking_lot::Mutex;
use std::collections::VecDeque;
use tokio::sync::Notify;

use super::Delivery;

/// A drained queue that grew beyond this many slots gives its memory back.
const KEEP_SLOTS: usize = 16;

/// Why [`DeliveryQueue::try_send`] did not take a delivery.
#[derive(Debug)]
pub enum Refused {
    /// `capacity` deliveries wait already.
    Full(Delivery),
    /// The connection has ended.
    Closed(Delivery),
}

pub struct DeliveryQueue {
    items: Mutex<Items>,
    /// Woken on the first delivery into an empty queue; holds a permit if nobody waits.
    ready: Notify,
    capacity: usize,
}

#[derive(Default)]
struct Items {
    queue: VecDeque<Delivery>,
    closed: bool,
}

impl DeliveryQueue {
    pub fn new(capacity: usize) -> DeliveryQueue {
        DeliveryQueue { items: Mutex::new(Items::default()), ready: Notify::new(), capacity: capacity.max(1) }
    }

    /// Queue a delivery unless the queue is full or closed. Never waits.
    pub fn try_send(&self, d: Delivery) -> Result<(), Refused> {
        let mut items = self.items.lock();
        if items.closed {
            return Err(Refused::Closed(d));
        }
        if items.queue.len() >= self.capacity {
            return Err(Refused::Full(d));
        }
        let was_empty = items.queue.is_empty();
        items.queue.push_back(d);
        drop(items);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The next delivery, if one waits.
    pub fn try_recv(&self) -> Option<Delivery> {
        let mut items = self.items.lock();
        let d = items.queue.pop_front();
        if items.queue.is_empty() && items.queue.capacity() > KEEP_SLOTS {
            items.queue = VecDeque::new();
        }
        d
    }

    /// Wait for the next delivery. Cancel-safe: a delivery is taken only when returned.
    /// One consumer (the session's connection).
    pub async fn recv(&self) -> Delivery {
        loop {
            if let Some(d) = self.try_recv() {
                return d;
            }
            // A delivery queued after `try_recv` left a permit: this returns at once.
            self.ready.notified().await;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.lock().queue.is_empty()
    }

    /// The connection ended: what waits is dropped and nothing more is taken.
    pub fn close(&self) {
        let mut items = self.items.lock();
        items.closed = true;
        items.queue = VecDeque::new();
    }
}

/// The connection's end of its queue: closes it when dropped.
pub struct Receiver(pub(super) std::sync::Arc<super::SessionSlot>);

impl Receiver {
    pub async fn recv(&self) -> Delivery {
        self.0.queue.recv().await
    }

    pub fn try_recv(&self) -> Option<Delivery> {
        self.0.queue.try_recv()
    }

    pub fn is_empty(&self) -> bool {
        self.0.queue.is_empty()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::mapping::Message;
    use std::sync::Arc;
    use std::time::Duration;

    fn delivery(offset: u64) -> Delivery {
        let record = crate::backend::Record {
            tp: crate::backend::TopicPartition::new(Arc::from("t"), 0),
            offset,
            record: crate::backend::CoreRecord {
                key: None,
                headers: Vec::new(),
                value: Default::default(),
                timestamp_ms: 0,
            },
        };
        Delivery::Live(Arc::new(record), Arc::new(Message::default()))
    }

    fn offset(d: &Delivery) -> u64 {
        match d {
            Delivery::Live(r, _) => r.offset,
            _ => u64::MAX,
        }
    }

    #[test]
    fn bounded_in_order_and_memory_follows_traffic() {
        let q = DeliveryQueue::new(100);
        assert_eq!(q.items.lock().queue.capacity(), 0, "nothing allocated before the first delivery");
        for i in 0..100 {
            assert!(q.try_send(delivery(i)).is_ok());
        }
        assert!(matches!(q.try_send(delivery(100)), Err(Refused::Full(_))));
        let got: Vec<u64> = std::iter::from_fn(|| q.try_recv()).map(|d| offset(&d)).collect();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(q.items.lock().queue.capacity(), 0, "a drained queue gives its memory back");
        q.close();
        assert!(matches!(q.try_send(delivery(0)), Err(Refused::Closed(_))));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_and_none_is_lost_between_check_and_wait() {
        let q = Arc::new(DeliveryQueue::new(8));
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..3 {
                    got.push(offset(&q.recv().await));
                }
                got
            })
        };
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            q.try_send(delivery(i)).map_err(|_| "refused").unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(got, vec![0, 1, 2]);
    }

    #[test]
    fn a_dropped_receiver_closes_the_queue() {
        let slot = Arc::new(crate::router::SessionSlot::new(1, "c".into(), 4));
        let rx = Receiver(slot.clone());
        assert!(slot.queue.try_send(delivery(0)).is_ok());
        drop(rx);
        assert!(slot.queue.is_empty());
        assert!(matches!(slot.queue.try_send(delivery(1)), Err(Refused::Closed(_))));
    }
}
