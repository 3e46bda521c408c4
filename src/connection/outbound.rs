//! Gateway → client: deliveries from the router, reading back from the core service when
//! lagging, the in-flight window and the write buffer.

use super::*;
use crate::trace::Kind;

pub(super) enum CatchupStep {
    Fetched(TopicPartition, Result<Fetched, BackendError>),
    Reattached(TopicPartition, u64, Result<Reattach, crate::router::RouterError>),
    Retry(TopicPartition, u64),
}

impl Conn {
    pub(super) fn on_delivery(&mut self, d: Delivery) {
        match d {
            Delivery::Live(record, message) => self.consider(&record.tp, record.offset, message, None),
            Delivery::Shared(shared) => {
                let (record, message, filter) = *shared;
                self.consider(&record.tp, record.offset, message, Some(&filter));
            }
            Delivery::Replay(records) => {
                for (record, message) in *records {
                    self.consider(&record.tp, record.offset, message, None);
                }
            }
        }
    }

    /// A record of the core service reached this session (live, replayed or read back).
    pub(super) fn consider(&mut self, tp: &TopicPartition, offset: u64, message: Arc<Message>, shared: Option<&str>) {
        if shared.is_none() {
            let cursor = self.state.cursor(tp, offset);
            if offset < cursor.next || cursor.already_handled(offset) {
                return;
            }
            cursor.next = offset + 1;
        }
        self.queue_if_matching(tp, offset, message, shared);
    }

    /// Queue a message of the core service for delivery if it has not expired and matches a
    /// subscription (`shared`: the `$share` filter it came for); QoS 1/2 ones (not shared)
    /// become pending at their offset. Returns whether it was queued.
    pub(super) fn queue_if_matching(
        &mut self,
        tp: &TopicPartition,
        offset: u64,
        message: Arc<Message>,
        shared: Option<&str>,
    ) -> bool {
        if message.expired(now_ms()) {
            return false;
        }
        let Some(m) = self.state.matches(&message, shared) else { return false };
        let origin = if m.qos != QoS::AtMostOnce && shared.is_none() {
            self.state.cursor(tp, offset).pending.insert(offset);
            Some(Origin { tp: tp.clone(), offset })
        } else {
            None
        };
        let retain = m.retain_as_published && message.retain;
        self.pending.push_back(Pending {
            message,
            qos: m.qos,
            retain,
            subscription_ids: m.subscription_ids,
            origin,
            on_subscribe: false,
        });
        self.dirty = true;
        true
    }

    /// Move messages from the pending queue into the in-flight window and the write buffer.
    pub(super) fn flush_pending(&mut self) {
        while self.out.len() < self.deliveries_high_water() {
            let Some(front) = self.pending.front() else { break };
            if front.qos != QoS::AtMostOnce && self.state.outbound.len() >= self.window {
                break;
            }
            let Some(p) = self.pending.pop_front() else { break };
            if p.on_subscribe {
                self.retained_waiting = self.retained_waiting.saturating_sub(1);
            }
            if p.message.expired(now_ms()) {
                self.trace(Kind::Dropped, &p.message, || "message expiry interval passed".into());
                self.state.ack_origin(&p.origin);
                continue;
            }
            let pid = if p.qos == QoS::AtMostOnce { None } else { self.state.next_packet_id() };
            let o = Outbound {
                message: p.message,
                qos: p.qos,
                retain: p.retain,
                subscription_ids: p.subscription_ids,
                origin: p.origin,
                stage: OutboundStage::Published,
            };
            let mut packet = Packet::Publish(publish_packet(&o, pid, false, self.protocol));
            let Ok(mut len) = protocol::encoded_len(&packet, self.protocol) else {
                self.state.ack_origin(&o.origin);
                continue;
            };
            if self.client_max_packet.is_some_and(|max| len > max) {
                // Too large for this client: dropped as if delivered [MQTT-3.1.2-25].
                self.trace(Kind::Dropped, &o.message, || {
                    format!("{len} bytes exceed the client's maximum packet size")
                });
                self.state.ack_origin(&o.origin);
                continue;
            }
            // A new alias adds its 3 bytes; a known one replaces the topic by nothing.
            let room_for_new = self.client_max_packet.is_none_or(|max| len + 3 <= max);
            if let (Packet::Publish(publish), Some((alias, known))) =
                (&mut packet, self.out_aliases.alias(&o.message.topic, room_for_new))
            {
                publish.properties.topic_alias = Some(alias);
                if known {
                    publish.topic.clear();
                }
                let Ok(aliased) = protocol::encoded_len(&packet, self.protocol) else {
                    self.state.ack_origin(&o.origin);
                    continue;
                };
                len = aliased;
            }
            self.reserve_out(len);
            if protocol::encode(&packet, self.protocol, &mut self.out).is_err() {
                self.state.ack_origin(&o.origin);
                continue;
            }
            self.ctx.metrics.message_out(o.qos).inc();
            self.trace(Kind::Delivered, &o.message, || match pid {
                Some(pid) => format!("qos={} packet_id={pid}", o.qos as u8),
                None => "qos=0".into(),
            });
            if let Some(pid) = pid {
                self.state.outbound.insert(pid, o);
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
        let tps: Vec<TopicPartition> = self.state.cursors.keys().cloned().collect();
        let positions = self.ctx.router.positions_of(&tps);
        if !self.rx.is_empty() {
            return;
        }
        let lagging: Vec<TopicPartition> = self.slot.lagging().into_iter().map(|(tp, _)| tp).collect();
        for (tp, pos) in positions {
            if lagging.contains(&tp) {
                continue;
            }
            if let Some(c) = self.state.cursors.get_mut(&tp) {
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
                if let Some(c) = self.state.cursors.get_mut(&tp) {
                    if f.high_watermark < c.next {
                        tracing::warn!(partition = %tp, position = c.next, end = f.high_watermark, "log shorter than the session's position; continuing from its end");
                        c.next = f.high_watermark;
                        c.acked.retain(|o| *o < f.high_watermark);
                    }
                }
                for rec in &f.records {
                    if let Some(message) = record_message(&self.ctx, &rec.tp, &rec.record) {
                        self.consider(&rec.tp, rec.offset, message, None);
                    } else {
                        let c = self.state.cursor(&rec.tp, rec.offset);
                        c.next = c.next.max(rec.offset + 1);
                    }
                }
                let c = self.state.cursor(&tp, f.next_offset);
                c.next = c.next.max(f.next_offset);
                let next = c.next;
                if f.records.is_empty() || f.next_offset >= f.high_watermark {
                    let router = self.ctx.router.clone();
                    let slot = self.slot.clone();
                    Some(
                        async move { CatchupStep::Reattached(tp.clone(), next, router.reattach(slot, tp, next).await) }
                            .boxed(),
                    )
                } else {
                    Some(self.fetch_step(tp, next))
                }
            }
            CatchupStep::Fetched(tp, Err(e)) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "reading back from the core service failed; retrying");
                let from = self.state.cursors.get(&tp).map(|c| c.next).unwrap_or(0);
                Some(
                    async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        CatchupStep::Retry(tp, from)
                    }
                    .boxed(),
                )
            }
            CatchupStep::Retry(tp, from) => Some(self.fetch_step(tp, from)),
            CatchupStep::Reattached(_, _, Ok(Reattach::Attached)) => None,
            CatchupStep::Reattached(tp, _, Ok(Reattach::Behind(from))) => Some(self.fetch_step(tp, from)),
            CatchupStep::Reattached(tp, from, Err(_)) => Some(
                async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    CatchupStep::Retry(tp, from)
                }
                .boxed(),
            ),
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

pub(super) fn publish_packet(o: &Outbound, packet_id: Option<PacketId>, dup: bool, protocol: Protocol) -> Publish {
    let mut properties =
        if protocol == Protocol::V5 { o.message.publish_properties(now_ms()) } else { PublishProperties::default() };
    if protocol == Protocol::V5 {
        properties.subscription_identifiers = o.subscription_ids.clone();
    }
    Publish {
        dup: dup && o.qos != QoS::AtMostOnce,
        qos: o.qos,
        retain: o.retain,
        topic: o.message.topic.to_string(),
        packet_id,
        payload: o.message.payload.clone(),
        properties,
    }
}

pub(super) fn empty_message() -> Message {
    Message { qos: QoS::AtLeastOnce, ..Message::default() }
}

/// Topic aliases the gateway assigns towards one MQTT 5 client: at most the Topic Alias
/// Maximum the client announced (and `mqtt.topic_alias_max`), the least recently used one
/// re-assigned when all are taken. Per connection: a new connection starts with none.
pub(super) struct OutAliases {
    max: u16,
    /// Topic, alias, last use.
    entries: Vec<(Arc<str>, u16, u64)>,
    clock: u64,
}

impl OutAliases {
    pub(super) fn new(max: u16) -> OutAliases {
        OutAliases { max, entries: Vec::new(), clock: 0 }
    }

    /// The alias to send `topic` with, and whether the client knows it already (then the
    /// topic name is left out); a new mapping only when `may_add`.
    pub(super) fn alias(&mut self, topic: &Arc<str>, may_add: bool) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| *e.0 == **topic) {
            e.2 = self.clock;
            return Some((e.1, true));
        }
        if !may_add {
            return None;
        }
        if self.entries.len() < usize::from(self.max) {
            let alias = u16::try_from(self.entries.len() + 1).ok()?;
            self.entries.push((topic.clone(), alias, self.clock));
            return Some((alias, false));
        }
        let lru = self.entries.iter_mut().min_by_key(|e| e.2)?;
        *lru = (topic.clone(), lru.1, self.clock);
        Some((lru.1, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_assigned_up_to_the_maximum_then_least_recently_used_reassigned() {
        let t = |s: &str| -> Arc<str> { s.into() };
        let mut a = OutAliases::new(2);
        assert_eq!(a.alias(&t("a"), true), Some((1, false)));
        assert_eq!(a.alias(&t("b"), true), Some((2, false)));
        assert_eq!(a.alias(&t("a"), true), Some((1, true)));
        // `b` is the least recently used: `c` takes its alias.
        assert_eq!(a.alias(&t("c"), true), Some((2, false)));
        assert_eq!(a.alias(&t("b"), false), None, "no new mapping when not allowed");
        assert_eq!(a.alias(&t("c"), false), Some((2, true)));
        assert_eq!(OutAliases::new(0).alias(&t("a"), true), None);
    }
}
