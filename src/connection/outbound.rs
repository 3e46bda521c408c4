//! Gateway → client: deliveries from the router, reading back from the core service when
//! lagging, the in-flight window and the write buffer.

use super::*;
use crate::session::machine::Next;
use crate::trace::Kind;

pub(super) enum CatchupStep {
    Fetched(TopicPartition, Result<Fetched, BackendError>),
    Retry(TopicPartition, u64),
}

impl Conn {
    /// Something the router delivered: queued if it matches.
    pub(super) fn on_delivery(&mut self, d: Delivery) {
        self.session.on_delivery(d, now_ms());
    }

    /// Move queued messages into the in-flight window and the write buffer while the buffer
    /// is below the deliveries' high-water mark.
    pub(super) fn flush_pending(&mut self) {
        let now = now_ms();
        while self.out.below_high_water() {
            let Some(next) = self.session.next_publish(now) else { break };
            match next {
                Next::Dropped { message, why } => self.trace(Kind::Dropped, &message, || why.to_string()),
                Next::Send { packet, len, message, qos, packet_id } => {
                    if self.out.send_sized(&packet, len, self.protocol).is_err() {
                        self.session.abandon(packet_id);
                        continue;
                    }
                    self.ctx.metrics.message_out(qos).inc();
                    self.trace(Kind::Delivered, &message, || match packet_id {
                        Some(pid) => format!("qos={} packet_id={pid}", qos as u8),
                        None => "qos=0".into(),
                    });
                }
            }
        }
    }

    /// A trace event about `message` and this client, when the message is traced.
    pub(super) fn trace(&self, kind: Kind, message: &Message, detail: impl FnOnce() -> String) {
        self.ctx.tracer.on(kind, (&message.topic, message.msg_id.as_deref()), &self.client_id, detail);
    }

    /// Move cursors past records that were routed but did not match this session, so a
    /// later catch-up does not re-read them. Safe only for partitions delivered live with an
    /// empty queue: the routing position is read first, and every matching record below it
    /// was put in the queue before the position moved.
    pub(super) fn advance_idle_cursors(&mut self) {
        let tps: Vec<TopicPartition> = self.session.state.cursors.keys().cloned().collect();
        let positions = self.ctx.router.positions_of(&tps);
        if !self.rx.is_empty() {
            return;
        }
        let lagging: Vec<TopicPartition> = self.slot.lagging().into_iter().map(|(tp, _)| tp).collect();
        for (tp, pos) in positions {
            if lagging.contains(&tp) {
                continue;
            }
            if let Some(c) = self.session.state.cursors.get_mut(&tp) {
                c.next = c.next.max(pos);
            }
        }
    }

    pub(super) fn fetch_step(&self, tp: TopicPartition, from: u64) -> BoxFuture<'static, CatchupStep> {
        let fut = self.ctx.backend.fetch(&tp, from, CATCHUP_BATCH);
        async move { CatchupStep::Fetched(tp, fut.await) }.boxed()
    }

    pub(super) fn on_catchup(&mut self, step: CatchupStep) -> Option<BoxFuture<'static, CatchupStep>> {
        match step {
            CatchupStep::Fetched(tp, Ok(f)) => {
                // A log that is shorter than our position (records lost with a power failure
                // before their fsync, never acknowledged to their publishers): continue from
                // its end instead of skipping whatever is written there next.
                if let Some(c) = self.session.state.cursors.get_mut(&tp) {
                    if f.high_watermark < c.next {
                        tracing::warn!(partition = %tp, position = c.next, end = f.high_watermark, "log shorter than the session's position; continuing from its end");
                        c.next = f.high_watermark;
                        c.acked.retain(|o| *o < f.high_watermark);
                    }
                }
                let now = now_ms();
                for rec in &f.records {
                    if let Some(message) = record_message(&self.ctx, &rec.tp, &rec.record) {
                        self.session.consider(&rec.tp, rec.offset, message, None, now);
                    } else {
                        let c = self.session.state.cursor(&rec.tp, rec.offset);
                        c.next = c.next.max(rec.offset + 1);
                    }
                }
                let c = self.session.state.cursor(&tp, f.next_offset);
                c.next = c.next.max(f.next_offset);
                let next = c.next;
                if f.records.is_empty() || f.next_offset >= f.high_watermark {
                    match self.ctx.router.reattach(&self.slot, &tp, next) {
                        Reattach::Attached => None,
                        Reattach::Behind(from) => Some(self.fetch_step(tp, from)),
                    }
                } else {
                    Some(self.fetch_step(tp, next))
                }
            }
            CatchupStep::Fetched(tp, Err(e)) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "reading back from the core service failed; retrying");
                let from = self.session.state.cursors.get(&tp).map(|c| c.next).unwrap_or(0);
                Some(
                    async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        CatchupStep::Retry(tp, from)
                    }
                    .boxed(),
                )
            }
            CatchupStep::Retry(tp, from) => Some(self.fetch_step(tp, from)),
        }
    }
}

pub(super) fn record_message(
    ctx: &Context,
    tp: &TopicPartition,
    rec: &crate::backend::CoreRecord,
) -> Option<Arc<Message>> {
    ctx.router.topics().message_of(&tp.topic, rec).map(Arc::new)
}
