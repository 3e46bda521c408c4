//! The connection's appends, beside its loop: PUBLISHes that passed the checks wait here in
//! arrival order for their core topic and their place in the log (one at a time, so the
//! log's order is the client's), then for the core service's acknowledgement (many at once,
//! completed in order). Neither wait is inside a branch of the loop: a new core topic being
//! created or a core service whose queue is full does not hold off keepalive, writes,
//! deliveries or a takeover. Every wait is bounded by `mqtt.backend_timeout_secs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::FutureExt;

use crate::context::Context;
use crate::ingest::Appending;
use crate::protocol::{PacketId, QoS};
use crate::router::mapping::{CoreTopic, Message};
use crate::router::RouterError;
use crate::session::machine::Appended;

/// A checked PUBLISH on its way into the core service.
pub(super) struct Job {
    pub core: CoreTopic,
    pub message: Arc<Message>,
    pub packet_id: Option<PacketId>,
    /// The QoS 2 marker of a persistent session's PUBLISH (`inbound::qos2_intent`).
    pub qos2_id: Option<String>,
    /// Delayed: (due, now), epoch ms.
    pub delayed: Option<(i64, i64)>,
}

/// A job that has its place in the log's order, or why it could not get it.
pub(super) struct Placed {
    pub packet_id: Option<PacketId>,
    pub qos: QoS,
    pub result: Result<(Appending, Arc<str>), NotPlaced>,
}

pub(super) enum NotPlaced {
    /// No room for another core topic (`limits.max_core_topics`).
    TopicLimit,
    /// The core topic could not be created or checked.
    Unavailable(String),
    /// The core service refused the append outright (answered like a failed append).
    Refused(String),
    /// The core service's queue stayed full for the whole timeout.
    QueueFull,
}

/// Jobs waiting for their place in the log, placed one at a time.
pub(super) struct Placing {
    ctx: Arc<Context>,
    timeout: Duration,
    waiting: VecDeque<Job>,
    running: Option<BoxFuture<'static, Placed>>,
}

impl Placing {
    /// Whether a job is being placed (then [`Placing::placed`] completes).
    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.running.is_some())
    }

    /// Give up the jobs not placed yet (the one being placed included).
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.running = None;
    }

    pub fn push(&mut self, job: Job) {
        if self.running.is_none() {
            self.running = Some(place(self.ctx.clone(), job, self.timeout));
        } else {
            self.waiting.push_back(job);
        }
    }

    /// The job being placed, once it is; the next one starts. Cancel-safe: dropped before it
    /// completes, the job stays where it was. Never completes when nothing is being placed.
    pub async fn placed(&mut self) -> Placed {
        let Some(running) = self.running.as_mut() else { return std::future::pending().await };
        let placed = running.await;
        self.running = self.waiting.pop_front().map(|job| place(self.ctx.clone(), job, self.timeout));
        placed
    }
}

/// Both stages of a connection's appends.
pub(super) struct Appends {
    pub placing: Placing,
    /// Placed appends, waiting for the core service's acknowledgement, in publish order.
    pub acks: FuturesOrdered<BoxFuture<'static, Appended>>,
    ctx: Arc<Context>,
    timeout: Duration,
}

impl Appends {
    pub fn new(ctx: Arc<Context>, timeout: Duration) -> Appends {
        Appends {
            placing: Placing { ctx: ctx.clone(), timeout, waiting: VecDeque::new(), running: None },
            acks: FuturesOrdered::new(),
            ctx,
            timeout,
        }
    }

    /// PUBLISHes handed over and not yet answered by the core service.
    pub fn outstanding(&self) -> usize {
        self.placing.len() + self.acks.len()
    }

    /// Wait for the acknowledgement of a placed append (bounded), in order.
    pub fn acknowledge(&mut self, placed: Placed) {
        let (packet_id, qos, timeout) = (placed.packet_id, placed.qos, self.timeout);
        let metrics = self.ctx.metrics.clone();
        let ack = match placed.result {
            Ok((append, msg_id)) => async move {
                let outcome = match tokio::time::timeout(timeout, append).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => {
                        metrics.append_errors.inc();
                        Err(format!("no acknowledgement within {timeout:?}"))
                    }
                };
                Appended { packet_id, qos, outcome, msg_id: Some(msg_id) }
            }
            .boxed(),
            Err(NotPlaced::Refused(e)) => {
                async move { Appended { packet_id, qos, outcome: Err(e), msg_id: None } }.boxed()
            }
            // The caller answers the others itself.
            Err(_) => return,
        };
        self.acks.push_back(ack);
    }
}

/// Create the core topic if it is new, then queue the record (this is where a full core
/// service pushes back), each bounded.
fn place(ctx: Arc<Context>, job: Job, timeout: Duration) -> BoxFuture<'static, Placed> {
    async move {
        let (packet_id, qos) = (job.packet_id, job.message.qos);
        let result = async {
            match tokio::time::timeout(timeout, ctx.router.ensure_for_publish(&job.core, &job.message.topic)).await {
                Ok(Ok(())) => {}
                Ok(Err(RouterError::TopicLimit(_))) => return Err(NotPlaced::TopicLimit),
                Ok(Err(e)) => return Err(NotPlaced::Unavailable(e.to_string())),
                Err(_) => return Err(NotPlaced::Unavailable(format!("core topic not ready within {timeout:?}"))),
            }
            let stored = crate::ingest::store(&ctx, &job.core.name, job.message, job.qos2_id, job.delayed);
            match tokio::time::timeout(timeout, stored).await {
                Ok(Ok(placed)) => Ok(placed),
                Ok(Err(e)) => Err(NotPlaced::Refused(e.to_string())),
                Err(_) => Err(NotPlaced::QueueFull),
            }
        }
        .await;
        Placed { packet_id, qos, result }
    }
    .boxed()
}
