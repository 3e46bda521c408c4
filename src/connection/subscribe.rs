//! SUBSCRIBE and UNSUBSCRIBE. A SUBSCRIBE's filters are checked at once (syntax, limits,
//! reserved namespace, ACL, quotas); what it waits for — new core topics tailed here, the
//! retained index after a start, retained messages read from the store — runs beside the
//! loop (`waiting`). The router takes the subscriptions only when that is done (no live
//! delivery of a new subscription can come before it), then the SUBACK goes out, followed by
//! the retained messages, before any live delivery the new subscriptions bring.

use super::appends::Appends;
use super::waiting::{Resume, Step};
use super::*;
use crate::labels::Refusal;
use crate::router::retained::RetainedMatch;
use crate::router::RouterError;
use crate::session::machine::SubscribePlan;

/// How long a SUBSCRIBE waits for the retained index after a start (see `router::retained`).
const RETAINED_INDEX_WAIT: Duration = Duration::from_secs(30);

/// A SUBSCRIBE whose filters passed the checks, waiting for its core topics.
pub(super) struct Subscribing {
    packet_id: PacketId,
    identifier: Option<u32>,
    plan: SubscribePlan,
    /// The code of each distinct filter; `None`: subscribed once its core topics are ready.
    codes: Vec<Option<ReasonCode>>,
}

/// A SUBSCRIBE the router took, waiting for its retained messages.
pub(super) struct Subscribed {
    packet_id: PacketId,
    identifier: Option<u32>,
    /// The SUBACK's codes, one per filter of the packet.
    codes: Vec<ReasonCode>,
    /// More retained messages matched than one SUBSCRIBE may get.
    retained_cut: bool,
}

impl Conn {
    pub(super) fn on_subscribe(&mut self, s: Subscribe, appends: &mut Appends) -> Result<(), End> {
        let plan = SubscribePlan::new(&s);
        let mut codes = Vec::with_capacity(plan.distinct.len());
        // The quotas count the filters of this SUBSCRIBE accepted before.
        let (mut added, mut groups) = (0, Vec::new());
        for (filter, _, any_no_local) in &plan.distinct {
            codes.push(self.check_filter(filter, *any_no_local, &mut added, &mut groups)?);
        }
        let pending: Vec<String> =
            plan.distinct.iter().zip(&codes).filter(|(_, c)| c.is_none()).map(|(d, _)| d.0.clone()).collect();
        // Retained messages go to a filter by its Retain Handling, never to a shared one.
        let may_want_retained = plan.distinct.iter().zip(&codes).any(|((f, o, _), c)| {
            c.is_none() && !f.starts_with("$share/") && o.retain_handling != crate::protocol::RetainHandling::Never
        });
        let op = Subscribing { packet_id: s.packet_id, identifier: s.properties.subscription_identifier, plan, codes };
        let router = self.ctx.router.clone();
        let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let step = async move {
            let mut ready = Vec::with_capacity(pending.len());
            for filter in &pending {
                ready.push(match tokio::time::timeout(timeout, router.prepare_subscribe(filter)).await {
                    Ok(r) => r,
                    Err(_) => Err(RouterError::Backend(BackendError::Timeout(timeout))),
                });
            }
            // The retained index is loaded in the background after a start: a SUBSCRIBE
            // right after it waits (bounded) so that it gets every retained message.
            let loaded = !may_want_retained || router.retained_loaded(RETAINED_INDEX_WAIT).await;
            Resume::Subscribe(op, ready, loaded)
        };
        self.wait_for(Step::new(step.boxed()), appends)
    }

    /// The checks of one filter that need no waiting: `Some(code)` refuses it.
    fn check_filter<'a>(
        &mut self,
        filter: &'a str,
        any_no_local: bool,
        added: &mut usize,
        groups: &mut Vec<&'a str>,
    ) -> Result<Option<ReasonCode>, End> {
        let Ok(parsed) = topic::parse_filter(filter) else { return Ok(Some(ReasonCode::TOPIC_FILTER_INVALID)) };
        if parsed.group.is_some() && any_no_local {
            return Err(End::Server(ReasonCode::PROTOCOL_ERROR, "no local on a shared subscription [MQTT-3.8.3-4]"));
        }
        if self.ctx.limits.check_filter(parsed.filter).is_err() {
            return Ok(Some(ReasonCode::TOPIC_FILTER_INVALID));
        }
        if self.ctx.router.topics().resolve(topic::parent(parsed.filter)) == Err(Unmapped::Reserved) {
            return Ok(Some(self.ctx.limits.refuse_reserved().reason_code()));
        }
        if let Err(d) = self.identity.check_subscribe(filter) {
            if d.token_invalid.is_some() {
                return Err(self.deny(d));
            }
            return Ok(Some(d.reason_code));
        }
        // Replacing a subscription the client holds does not count against the quota.
        let new = !self.session.holds(filter);
        if new && self.ctx.limits.check_subscription_count(self.session.state.subscriptions.len() + *added).is_err() {
            return Ok(Some(ReasonCode::QUOTA_EXCEEDED));
        }
        let share_groups = self.session.state.share_groups_with(groups.iter().copied().chain(parsed.group));
        if let Err(r) = self.ctx.limits.check_share_groups(share_groups) {
            return Ok(Some(r.reason_code()));
        }
        *added += usize::from(new);
        groups.extend(parsed.group);
        Ok(None)
    }

    /// The core topics are ready: the router takes each subscription, the session records
    /// it, and the retained messages it gets are looked up (read next, beside the loop).
    pub(super) fn on_subscribe_ready(
        &mut self,
        op: Subscribing,
        ready: Vec<Result<(), RouterError>>,
        loaded: bool,
    ) -> Step {
        let Subscribing { packet_id, identifier, plan, mut codes } = op;
        let router = self.ctx.router.clone();
        // Retained messages waiting per connection are bounded: earlier SUBSCRIBEs' unsent
        // ones count against this one's share.
        let mut budget =
            self.ctx.config.mqtt.max_retained_per_subscribe.saturating_sub(self.session.retained_waiting());
        let mut retained_cut = false;
        let mut reads: Vec<(Vec<RetainedMatch>, QoS)> = Vec::new();
        let now = now_ms();
        let mut ready = ready.into_iter();
        for ((filter, options, _), code) in plan.distinct.iter().zip(codes.iter_mut()) {
            if code.is_some() {
                continue;
            }
            let attached = ready
                .next()
                .unwrap_or(Err(RouterError::Stopped))
                .and_then(|()| router.attach(&self.slot, filter, options.qos));
            let positions = match attached {
                Ok(p) => p,
                Err(e) => {
                    *code = Some(self.subscription_refused(e));
                    continue;
                }
            };
            *code = Some(ReasonCode(options.qos as u8));
            if self.session.subscribed(filter, *options, identifier, positions) {
                if !loaded {
                    tracing::warn!(client_id = %self.client_id, "retained index still loading: retained messages may be missing");
                }
                let (topics, matched) = router.retained_matching(retained_filter(filter), budget, now);
                retained_cut |= matched > topics.len();
                budget = budget.saturating_sub(topics.len());
                reads.push((topics, options.qos));
            }
        }
        let codes: Vec<ReasonCode> = codes.into_iter().map(|c| c.unwrap_or(ReasonCode::UNSPECIFIED_ERROR)).collect();
        let done = Subscribed { packet_id, identifier, codes: plan.codes(&codes), retained_cut };
        let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let step = async move {
            let mut retained = Vec::with_capacity(reads.len());
            for (topics, qos) in reads {
                let messages = tokio::time::timeout(timeout, router.retained_messages(topics, now)).await;
                retained.push((messages.unwrap_or_default(), qos));
            }
            Resume::Retained(done, retained)
        };
        Step::holding_deliveries(step.boxed())
    }

    /// The SUBACK, then the retained messages.
    pub(super) fn on_retained(&mut self, done: Subscribed, retained: Vec<(Vec<Arc<Message>>, QoS)>) {
        if done.retained_cut {
            self.ctx.limits.count(Refusal::RetainedPerSubscribe);
        }
        let suback = SubAck { packet_id: done.packet_id, codes: done.codes, properties: AckProperties::default() };
        self.send(&Packet::SubAck(suback));
        for (messages, granted) in retained {
            for message in messages {
                let qos = message.qos.min(granted);
                self.session.queue_retained(message, qos, done.identifier.into_iter().collect());
            }
        }
    }

    /// The SUBACK code of a subscription the router could not take.
    fn subscription_refused(&self, e: RouterError) -> ReasonCode {
        match e {
            RouterError::UndeclaredParent(_) => ReasonCode::TOPIC_FILTER_INVALID,
            RouterError::Reserved(_) => self.ctx.limits.refuse_reserved().reason_code(),
            RouterError::TopicLimit(_) => self.ctx.limits.count(Refusal::CoreTopicLimit).reason_code(),
            e => {
                tracing::warn!(error = %e, "subscribe failed");
                ReasonCode::UNSPECIFIED_ERROR
            }
        }
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            codes.push(self.session.unsubscribe(f));
            self.ctx.router.unsubscribe(&self.slot, f);
        }
        self.send(&Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, codes, properties: AckProperties::default() }));
    }
}

/// The topic filter a (possibly `$share/...`) subscription matches retained messages with.
fn retained_filter(filter: &str) -> &str {
    topic::parse_filter(filter).map_or(filter, |p| p.filter)
}
