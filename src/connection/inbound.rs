//! Client → gateway: PUBLISH stored through the core service and acknowledged only once
//! durable, SUBSCRIBE / UNSUBSCRIBE.

use super::appends::{Appends, Job, NotPlaced, Placed};
use super::waiting::{Resume, Step};
use super::*;
use crate::config::Naming;
use crate::labels::Refusal;
use crate::router::RouterError;
use crate::session::machine::{AppendStep, Appended, Qos2Publish, Violation};

/// The connection closes on a PUBLISH that breaks the protocol.
fn violation(v: Violation) -> End {
    End::Server(v.code, v.why)
}

impl Conn {
    /// Refuse a PUBLISH: MQTT 5 QoS 1/2 gets a negative acknowledgement and stays connected;
    /// otherwise the protocol has no negative answer and the connection closes.
    pub(super) fn refuse_publish(&mut self, p: &Publish, code: ReasonCode, why: &'static str) -> Result<(), End> {
        tracing::debug!(client_id = %self.client_id, topic = %p.topic, reason = why, "publish refused");
        self.refuse(p.qos, p.packet_id, code, why)
    }

    fn refuse(
        &mut self,
        qos: QoS,
        packet_id: Option<PacketId>,
        code: ReasonCode,
        why: &'static str,
    ) -> Result<(), End> {
        match (self.protocol, qos, packet_id) {
            (Protocol::V5, QoS::AtLeastOnce, Some(pid)) => {
                self.send(&Packet::PubAck(PubResponse { packet_id: pid, code, properties: AckProperties::default() }));
                Ok(())
            }
            (Protocol::V5, QoS::ExactlyOnce, Some(pid)) => {
                self.send(&Packet::PubRec(PubResponse { packet_id: pid, code, properties: AckProperties::default() }));
                Ok(())
            }
            _ => Err(End::Server(code, why)),
        }
    }

    pub(super) fn on_publish(&mut self, mut p: Publish, appends: &mut Appends) -> Result<(), End> {
        // Topic alias (MQTT 5, client → server); a new mapping is remembered only once its
        // topic passed the checks below.
        let new_alias = self.session.resolve_alias(&mut p).map_err(violation)?;
        if p.topic == tokens::SYS_UPLOAD_TOKEN {
            if let Some(alias) = new_alias {
                self.session.remember_alias(alias, p.topic.clone());
            }
            // The gateway's own topic: not stored, not subject to the ACL.
            self.on_upload_token(&p.payload)?;
            match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(pid)) => self.send(&Packet::PubAck(PubResponse::new(pid))),
                (QoS::ExactlyOnce, Some(pid)) => {
                    // Counts against the Receive Maximum until its PUBREL, like any QoS 2.
                    self.session.begin_receive(QoS::ExactlyOnce).map_err(violation)?;
                    self.session.state.inbound_qos2.insert(pid.get());
                    self.send(&Packet::PubRec(PubResponse::new(pid)));
                }
                _ => {}
            }
            return Ok(());
        }
        if p.topic == offline::SYS_GET_OFFLINE_MSG {
            if let Some(alias) = new_alias {
                self.session.remember_alias(alias, p.topic.clone());
            }
            return self.on_pull_request(&p, appends);
        }
        // Delayed (SPEC §9): `$delayed/<seconds>/<topic>`, or MQTT 5's `__STARTDELIVERTIME`;
        // everything below checks and stores the target topic.
        let mut alias_topic = None;
        let mut delayed = None;
        let now = self.ctx.delay.clock.now_ms();
        if let Some(parsed) = crate::delay::parse_delayed_topic(&p.topic) {
            match parsed {
                Ok((delay_ms, target)) => {
                    let target = target.to_owned();
                    // The topic's delay counts; the property is not passed on either way.
                    p.properties.user_properties.retain(|(k, _)| k != crate::delay::START_DELIVER_TIME);
                    alias_topic = Some(std::mem::replace(&mut p.topic, target));
                    delayed = (delay_ms > 0).then_some((now + delay_ms, now));
                }
                Err(why) => {
                    self.ctx.delay.refused(why);
                    return self.refuse_publish(
                        &p,
                        ReasonCode::TOPIC_NAME_INVALID,
                        "delayed topic malformed or beyond 40 days",
                    );
                }
            }
        } else if let Some(i) =
            p.properties.user_properties.iter().position(|(k, _)| k == crate::delay::START_DELIVER_TIME)
        {
            match crate::delay::parse_start_time(&p.properties.user_properties[i].1, now) {
                Ok(due) => {
                    p.properties.user_properties.remove(i);
                    delayed = (due > now).then_some((due, now));
                }
                Err(why) => {
                    self.ctx.delay.refused(why);
                    return self.refuse_publish(
                        &p,
                        ReasonCode::PAYLOAD_FORMAT_INVALID,
                        "__STARTDELIVERTIME malformed or beyond 40 days",
                    );
                }
            }
        }
        // Any other message ends the wait for an offline pull request.
        self.offline.push();
        self.session.begin_receive(p.qos).map_err(violation)?;
        if let Err(r) = self.ctx.limits.check_payload(p.payload.len()) {
            self.session.end_receive(p.qos);
            return Err(End::Server(r.reason_code(), "payload too large"));
        }
        if p.retain && !self.ctx.config.mqtt.retain_available {
            self.session.end_receive(p.qos);
            return Err(End::Server(ReasonCode::RETAIN_NOT_SUPPORTED, "retain not supported"));
        }
        // LMQ names have no `$` topics; MQTT names have all but `$SYS` (refused as reserved below).
        if (p.topic.starts_with('$') && self.ctx.config.naming == Naming::Lmq)
            || self.ctx.limits.check_topic(&p.topic).is_err()
            || topic::validate_name(&p.topic).is_err()
        {
            self.session.end_receive(p.qos);
            return self.refuse_publish(&p, ReasonCode::TOPIC_NAME_INVALID, "topic name not allowed");
        }
        if let Some(alias) = new_alias {
            self.session.remember_alias(alias, alias_topic.unwrap_or_else(|| p.topic.clone()));
        }
        // The retained store every gateway holds is bounded (an empty payload only deletes).
        let limits = &self.ctx.config.limits;
        if p.retain
            && !p.payload.is_empty()
            && !self.ctx.router.retained_room(
                &p.topic,
                p.payload.len(),
                limits.max_retained_messages,
                limits.max_retained_bytes,
            )
        {
            self.ctx.limits.count(Refusal::RetainedStoreFull);
            self.session.end_receive(p.qos);
            return self.refuse_publish(&p, ReasonCode::QUOTA_EXCEEDED, "retained store full");
        }
        let core = match self.ctx.router.topics().resolve(topic::parent(&p.topic)) {
            Ok(core) => core,
            Err(Unmapped::Undeclared) => {
                self.session.end_receive(p.qos);
                return self.refuse_publish(&p, ReasonCode::TOPIC_NAME_INVALID, "parent topic not declared");
            }
            Err(Unmapped::Reserved) => {
                // Whatever the ACL says: the same answer as an ACL refusal (SPEC §8).
                self.session.end_receive(p.qos);
                let r = self.ctx.limits.refuse_reserved();
                return self.refuse_publish(&p, r.reason_code(), "reserved topic");
            }
        };
        if let Err(d) = self.identity.check_publish(&p.topic) {
            self.session.end_receive(p.qos);
            if d.token_invalid.is_some() {
                return Err(self.deny(d));
            }
            return self.refuse_publish(&p, d.reason_code, d.reason);
        }
        // QoS 2 re-sent before PUBREL: already stored, acknowledge again without storing twice
        // (once the PUBREC may be sent at all, see `on_ack`); re-sent while the first copy is
        // still being stored: that copy's PUBREC answers both.
        if let (QoS::ExactlyOnce, Some(pid)) = (p.qos, p.packet_id) {
            if let Qos2Publish::Duplicate { reply } = self.session.on_qos2_publish(pid) {
                if let Some(reply) = reply {
                    self.send(&reply);
                }
                return Ok(());
            }
        }
        let message = Arc::new(Message::from_publish(&mut p, self.slot.client_id.clone(), now_ms()));
        let (packet_id, qos) = (p.packet_id, p.qos);
        if let (QoS::ExactlyOnce, Some(pid)) = (qos, packet_id) {
            if self.session.expiry > 0 {
                // The intent is saved with the session before the record is written (below).
                let op = Qos2Storing { job: Job { core, message, packet_id, qos2_id: None, delayed }, pid };
                let step = self.look_for_qos2(op);
                return self.wait_for(step, appends);
            }
            self.session.storing_qos2(pid);
        }
        self.place(Job { core, message, packet_id, qos2_id: None, delayed }, appends)
    }

    /// Placed in the log in arrival order, beside the loop; acknowledged once stored.
    fn place(&mut self, job: Job, appends: &mut Appends) -> Result<(), End> {
        let qos = job.message.qos;
        self.ctx.metrics.message_in(qos).inc();
        appends.placing.push(job);
        self.take_placed(appends)
    }

    /// Handle every placement that is complete without waiting (usually all of them: the
    /// core service has room), so a burst of PUBLISHes costs no loop turn each.
    pub(super) fn take_placed(&mut self, appends: &mut Appends) -> Result<(), End> {
        while let Some(placed) = appends.placing.placed().now_or_never() {
            self.on_placed(placed, appends)?;
        }
        Ok(())
    }

    /// A PUBLISH has its place in the log (its acknowledgement is awaited next, in order), or
    /// is refused: no room for its core topic, or the core service unavailable or full.
    pub(super) fn on_placed(&mut self, placed: Placed, appends: &mut Appends) -> Result<(), End> {
        let (qos, packet_id) = (placed.qos, placed.packet_id);
        match &placed.result {
            Ok(_) | Err(NotPlaced::Refused(_)) => {
                appends.acknowledge(placed);
                Ok(())
            }
            Err(NotPlaced::TopicLimit) => {
                self.session.not_stored(qos, packet_id);
                let r = self.ctx.limits.count(Refusal::CoreTopicLimit);
                self.refuse(qos, packet_id, r.reason_code(), "no room for another core topic")
            }
            Err(NotPlaced::Unavailable(e)) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "cannot create core topic");
                self.session.not_stored(qos, packet_id);
                Err(End::Server(ReasonCode::SERVER_BUSY, "core service unavailable"))
            }
            Err(NotPlaced::QueueFull) => {
                self.session.not_stored(qos, packet_id);
                Err(End::Server(ReasonCode::SERVER_BUSY, "core service queue full"))
            }
        }
    }

    /// QoS 2 exactly once across a crash, for a persistent session: before its record is
    /// written, the PUBLISH's intent (a marker the record will carry, and the partitions'
    /// end offsets) is saved with the session. A session restored with an intent for a re-sent
    /// packet id looks for the marker in the log from those offsets: found, the PUBLISH is
    /// acknowledged without storing it again; otherwise it is stored under a new intent. The
    /// session cannot be saved: not stored, disconnected. First step: the core topic exists,
    /// the earlier intent's record looked for, the end offsets read.
    fn look_for_qos2(&mut self, op: Qos2Storing) -> Step {
        let (router, backend) = (self.ctx.router.clone(), self.ctx.backend.clone());
        let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let (core, topic) = (op.job.core.clone(), op.job.message.topic.clone());
        // A delayed message's record is in its first delay level.
        let stored_in = match op.job.delayed {
            Some((due, at)) => {
                let levels = &self.ctx.delay.levels;
                let name = levels.topic(levels.for_remaining(due - at));
                let partitions = self.ctx.backend.partitions(&name).unwrap_or(1);
                CoreTopic { name: name.into(), partitions }
            }
            None => core.clone(),
        };
        let earlier = self.session.state.qos2_intents.get(&op.pid.get()).cloned();
        let step = async move {
            let ensured = match tokio::time::timeout(timeout, router.ensure_for_publish(&core, &topic)).await {
                Ok(r) => r,
                Err(_) => Err(RouterError::Backend(BackendError::Timeout(timeout))),
            };
            let mut looked = Qos2Looked { ensured, earlier: None, ends: Ok(Vec::new()), stored_in: stored_in.name };
            if looked.ensured.is_err() {
                return Resume::Qos2Looked(op, looked);
            }
            if let Some(intent) = &earlier {
                looked.earlier =
                    Some(bounded(tokio::time::timeout(timeout, find_qos2_record(&backend, intent)).await, timeout));
            }
            if matches!(looked.earlier, None | Some(Ok(false))) {
                let ends = futures::future::try_join_all(
                    (0..stored_in.partitions)
                        .map(|p| backend.end_offset(&TopicPartition::new(looked.stored_in.clone(), p))),
                );
                looked.ends = bounded(tokio::time::timeout(timeout, ends).await, timeout);
            }
            Resume::Qos2Looked(op, looked)
        };
        Step::new(step.boxed())
    }

    /// Second step: stored before (a crash of the gateway that received it first) —
    /// acknowledged, not stored again; otherwise the session is saved with a new intent.
    pub(super) fn on_qos2_looked(&mut self, op: Qos2Storing, looked: Qos2Looked) -> Result<Option<Step>, End> {
        let (qos, pid) = (QoS::ExactlyOnce, op.pid);
        let busy = End::Server(ReasonCode::SERVER_BUSY, "core service unavailable");
        match looked.ensured {
            Ok(()) => {}
            Err(RouterError::TopicLimit(_)) => {
                self.session.end_receive(qos);
                let r = self.ctx.limits.count(Refusal::CoreTopicLimit);
                return self.refuse(qos, Some(pid), r.reason_code(), "no room for another core topic").map(|()| None);
            }
            Err(_) => {
                self.session.end_receive(qos);
                return Err(busy);
            }
        }
        match looked.earlier {
            Some(Ok(true)) => {
                tracing::debug!(client_id = %self.client_id, packet_id = pid.get(), "re-sent QoS 2 PUBLISH was stored before; not stored again");
                self.session.state.qos2_intents.remove(&pid.get());
                self.session.changed = true;
                // It counts against the Receive Maximum until its PUBREL, like any QoS 2 PUBLISH.
                self.session.found_stored_qos2(pid);
                return Ok(None);
            }
            Some(Err(e)) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "cannot look for a QoS 2 record");
                return Err(busy);
            }
            _ => {}
        }
        let Ok(from) = looked.ends else { return Err(busy) };
        let marker = format!("{}:{}:{}", self.ctx.gateway_id, qos2_nonce(), pid.get());
        self.session
            .state
            .qos2_intents
            .insert(pid.get(), Qos2Intent { marker: marker.clone(), topic: looked.stored_in.to_string(), from });
        let stored = Stored::from_state(&self.session.state, self.session.expiry, None).encode();
        // Saves land in the order they are made: the one in flight (without this intent) first.
        let earlier_save = self.persist.take();
        let (ctx, client_id) = (self.ctx.clone(), self.client_id.clone());
        let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let step = async move {
            let earlier = match earlier_save {
                Some(f) => Some(f.await),
                None => None,
            };
            ctx.metrics.session_saves.inc();
            let save = ctx.backend.put_state(StateStore::Sessions, &client_id, Some(stored));
            let saved = matches!(tokio::time::timeout(timeout, save).await, Ok(Ok(())));
            Resume::Qos2Saved(op, earlier, saved.then_some(marker))
        };
        Ok(Some(Step::saving(step.boxed())))
    }

    /// Last step: the intent is saved, the PUBLISH goes to its place in the log.
    pub(super) fn on_qos2_saved(
        &mut self,
        op: Qos2Storing,
        earlier: Option<Result<(), BackendError>>,
        marker: Option<String>,
        appends: &mut Appends,
    ) -> Result<(), End> {
        if let Some(res) = earlier {
            self.on_persisted(res);
        }
        let Some(marker) = marker else {
            self.session.state.qos2_intents.remove(&op.pid.get());
            return Err(End::Server(ReasonCode::SERVER_BUSY, "cannot save the session"));
        };
        self.stored = true;
        self.session.storing_qos2(op.pid);
        let mut job = op.job;
        job.qos2_id = Some(marker);
        self.place(job, appends)
    }

    /// The core service answered an append: acknowledge (or wait for the session save that
    /// must come first), or disconnect without acknowledging.
    pub(super) fn on_ack(&mut self, r: Appended) -> Result<(), End> {
        match self.session.on_appended(r, self.session.expiry > 0) {
            AppendStep::Stored { reply, .. } => {
                if let Some(reply) = reply {
                    self.send(&reply);
                }
                Ok(())
            }
            AppendStep::LostQos0(e) => {
                // Counted in `lmq_append_errors_total`; one line per message would flood the log
                // during an outage.
                tracing::debug!(client_id = %self.client_id, error = %e, "QoS 0 message not stored");
                Ok(())
            }
            AppendStep::Failed(e) => {
                // Never acknowledged: the client keeps the message and re-sends it.
                tracing::warn!(client_id = %self.client_id, error = %e, "message not stored; disconnecting without acknowledging it");
                Err(End::Server(ReasonCode::SERVER_BUSY, "core service did not acknowledge"))
            }
        }
    }
}

/// A persistent session's QoS 2 PUBLISH whose intent is being saved.
pub(super) struct Qos2Storing {
    job: Job,
    pid: PacketId,
}

/// What the first step of [`Qos2Storing`] found.
pub(super) struct Qos2Looked {
    ensured: Result<(), RouterError>,
    /// Whether the earlier intent's record (if the packet id had one) is in the log.
    earlier: Option<Result<bool, BackendError>>,
    /// The end offsets of `stored_in`'s partitions, from which the new intent's record will
    /// be looked for.
    ends: Result<Vec<u64>, BackendError>,
    stored_in: Arc<str>,
}

/// Whether a record with the intent's marker is in its topic at or after its offsets.
/// Records scanned at most to find a QoS 2 marker (a client that returns long after a crash
/// may find it stored twice rather than wait for a read of the whole log).
const QOS2_SCAN_MAX_RECORDS: usize = 1_000_000;

async fn find_qos2_record(
    backend: &crate::backend::SharedCoreService,
    intent: &Qos2Intent,
) -> Result<bool, BackendError> {
    let mut scanned = 0;
    for (p, from) in intent.from.iter().enumerate() {
        let Ok(partition) = u32::try_from(p) else { break };
        let tp = TopicPartition::new(intent.topic.clone(), partition);
        let end = backend.end_offset(&tp).await?;
        let mut next = *from;
        while next < end {
            let got = backend.fetch(&tp, next, 500).await?;
            let marked = got.records.iter().any(|r| {
                r.record.header(mapping::header::QOS2_ID).is_some_and(|m| m.as_ref() == intent.marker.as_bytes())
            });
            if marked {
                return Ok(true);
            }
            scanned += got.records.len();
            if got.records.is_empty() || got.next_offset <= next || scanned > QOS2_SCAN_MAX_RECORDS {
                break;
            }
            next = got.next_offset;
        }
    }
    if scanned > QOS2_SCAN_MAX_RECORDS {
        tracing::warn!(topic = %intent.topic, "QoS 2 marker not found within the scan bound; storing the PUBLISH again");
    }
    Ok(false)
}

/// The result of a read bounded by `timeout`.
fn bounded<T>(
    r: Result<Result<T, BackendError>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<T, BackendError> {
    r.unwrap_or(Err(BackendError::Timeout(timeout)))
}

/// A value no earlier intent of this ClientId used: the time in nanoseconds, made unique
/// within the process.
fn qos2_nonce() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    if prev >= now {
        LAST.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        now
    }
}
