//! Packet handling that waits for the router or the core service runs beside the
//! connection's loop, never inside one of its branches: a SUBSCRIBE's new core topics and
//! retained messages, an offline pull's reads, a persistent session's QoS 2 intent, a
//! revocation check after missed revocations. Each step is a `'static` future over what it
//! needs, whose result ([`Resume`]) the connection applies to the session when it completes;
//! an operation of several steps starts its next one from there. A step complete at once
//! (the usual case: the core topics exist, the retained messages are held) is applied at
//! once, without a loop turn.
//!
//! While a step runs the connection decodes no further packet (packets take effect in the
//! order they came), reads no more bytes, starts no session save and checks no keepalive
//! (the client's packets wait unread); it keeps writing, taking deliveries (except while a
//! SUBSCRIBE's retained messages are read: they go out before the live ones it brings) and
//! its appends' acknowledgements, and answers a takeover or a shutdown at once. Every step is
//! bounded by `mqtt.backend_timeout_secs` (the retained index after a start by its own wait).

use futures::future::BoxFuture;
use futures::FutureExt;

use super::appends::Appends;
use super::offline::{PullRead, Pulling};
use super::subscribe::{Subscribed, Subscribing};
use super::{inbound, Conn, End};
use crate::auth::Denied;
use crate::protocol::QoS;
use crate::router::mapping::Message;
use crate::router::RouterError;
use std::sync::Arc;

/// What a finished step hands back to the connection.
pub(super) enum Resume {
    /// A SUBSCRIBE's core topics are ready (one result per filter still to subscribe), and
    /// whether the retained index was loaded in time.
    Subscribe(Subscribing, Vec<Result<(), RouterError>>, bool),
    /// Its retained messages, per subscribed filter with the QoS it was granted.
    Retained(Subscribed, Vec<(Vec<Arc<Message>>, QoS)>),
    /// An offline pull's first request: the ends of the backlogs it holds from now on.
    PullHeld(Pulling, Vec<(crate::backend::TopicPartition, u64, Option<u64>)>),
    /// One read of a held backlog.
    Pulled(Pulling, PullRead),
    /// A persistent session's QoS 2 PUBLISH: its core topic, and its earlier intent looked for.
    Qos2Looked(inbound::Qos2Storing, inbound::Qos2Looked),
    /// ... the session saved with its new intent (`Some(marker)`) or not, after the save
    /// that was in flight (its result).
    Qos2Saved(inbound::Qos2Storing, Option<Result<(), crate::backend::BackendError>>, Option<String>),
    /// The identity checked against every current revocation.
    Rechecked(Option<Denied>),
}

/// One step of an operation.
pub(super) struct Step {
    future: BoxFuture<'static, Resume>,
    /// The step saves the session: the connection's end lets it finish (bounded) before its
    /// final save, which must land after it.
    saves: bool,
    /// Deliveries wait until the step is done.
    holds_deliveries: bool,
}

impl Step {
    pub fn new(future: BoxFuture<'static, Resume>) -> Step {
        Step { future, saves: false, holds_deliveries: false }
    }

    pub fn saving(future: BoxFuture<'static, Resume>) -> Step {
        Step { saves: true, ..Step::new(future) }
    }

    pub fn holding_deliveries(future: BoxFuture<'static, Resume>) -> Step {
        Step { holds_deliveries: true, ..Step::new(future) }
    }
}

/// The step running beside the loop, if any.
#[derive(Default)]
pub(super) struct Waiting(Option<Step>);

impl Waiting {
    pub fn busy(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the running step saves the session.
    pub fn saves(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.saves)
    }

    /// Whether deliveries wait for the running step.
    pub fn holds_deliveries(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.holds_deliveries)
    }

    /// The running step's result (pending forever if none). Cancel-safe: the step stays
    /// until it completes.
    pub async fn done(&mut self) -> Resume {
        match self.0.as_mut() {
            Some(step) => {
                let resume = (&mut step.future).await;
                self.0 = None;
                resume
            }
            None => std::future::pending().await,
        }
    }
}

impl Conn {
    /// Run `step`, and the steps that follow it: each one complete at once is applied at
    /// once; the first that has to wait runs beside the loop.
    pub(super) fn wait_for(&mut self, step: Step, appends: &mut Appends) -> Result<(), End> {
        let mut step = step;
        loop {
            match (&mut step.future).now_or_never() {
                Some(resume) => match self.resume(resume, appends)? {
                    Some(next) => step = next,
                    None => return Ok(()),
                },
                None => {
                    self.waiting.0 = Some(step);
                    return Ok(());
                }
            }
        }
    }

    /// A step finished beside the loop: apply it, and run what follows.
    pub(super) fn on_resume(&mut self, resume: Resume, appends: &mut Appends) -> Result<(), End> {
        match self.resume(resume, appends)? {
            Some(next) => self.wait_for(next, appends),
            None => Ok(()),
        }
    }

    fn resume(&mut self, resume: Resume, appends: &mut Appends) -> Result<Option<Step>, End> {
        match resume {
            Resume::Subscribe(op, ready, loaded) => Ok(Some(self.on_subscribe_ready(op, ready, loaded))),
            Resume::Retained(done, retained) => {
                self.on_retained(done, retained);
                Ok(None)
            }
            Resume::PullHeld(op, ends) => self.on_pull_held(op, ends),
            Resume::Pulled(op, read) => self.on_pulled(op, read),
            Resume::Qos2Looked(op, looked) => self.on_qos2_looked(op, looked),
            Resume::Qos2Saved(op, earlier, marker) => self.on_qos2_saved(op, earlier, marker, appends).map(|()| None),
            Resume::Rechecked(denied) => match denied {
                Some(d) => Err(self.deny(d)),
                None => Ok(None),
            },
        }
    }
}
