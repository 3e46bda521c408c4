//! The one ingest path of every message — a client's PUBLISH, a will, the admin API's send:
//! the message becomes a record of its core topic (with its message ID), is appended (or
//! placed in its first delay level), updates the retained store when retained, and is traced
//! (publish, delayed, stored or dropped). Callers resolve the core topic and check the
//! sender's rights first; they get the message ID at once and the acknowledgement later.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::backend::{BackendError, Position, StateStore};
use crate::context::Context;
use crate::router::mapping::{self, Message};
use crate::trace::Kind;

/// Resolves once the record (and a retained message's store update) is durable.
pub type Appending = BoxFuture<'static, Result<Position, BackendError>>;

/// `message` with another publication time (a will is published when it is due).
pub fn with_timestamp(message: Arc<Message>, ts: i64) -> Arc<Message> {
    let mut m = (*message).clone();
    m.timestamp_ms = ts;
    Arc::new(m)
}

/// Queue a message on its core topic (and, when retained, its retained-store update).
/// Resolves once the message has its place in the log's order; the returned future
/// resolves once both are durable.
pub async fn store(
    ctx: &Arc<Context>,
    core: &str,
    message: Arc<Message>,
    qos2_id: Option<String>,
    delayed: Option<(i64, i64)>,
) -> Result<(Appending, Arc<str>), BackendError> {
    let mut record = ctx.router.topics().to_record(&message);
    let msg_id: Arc<str> =
        record.header(crate::msgid::HEADER).and_then(|v| std::str::from_utf8(v).ok()).unwrap_or_default().into();
    if let Some(id) = qos2_id {
        record.headers.push((mapping::header::QOS2_ID.to_string(), Bytes::from(id)));
    }
    let value = (message.retain && !message.payload.is_empty()).then(|| mapping::encode_record(&record));
    // A delayed message is stored in its first delay level; its retain flag applies when it
    // is delivered (`delay::forward`).
    let core = match delayed {
        Some((due, now)) => ctx.delay.place(&mut record, due, now),
        None => core.to_owned(),
    };
    let due_ms = delayed.map(|(due, _)| due);
    let traced = ctx.tracer.wants(&message.topic, Some(&msg_id)).then(|| {
        let retain = if message.retain { " retain" } else { "" };
        let detail = format!("topic={} qos={}{retain}", message.topic, message.qos as u8);
        ctx.tracer.emit(Kind::Publish, &msg_id, &message.publisher, detail);
        if let Some(due) = due_ms {
            ctx.tracer.emit(Kind::Delayed, &msg_id, &message.publisher, format!("due_ms={due}"));
        }
        (ctx.tracer.clone(), msg_id.clone(), message.publisher.clone(), core.clone())
    });
    // Stored in a short level while this gateway forwards: handed to the level's forwarder.
    let handed = (due_ms.is_some() && ctx.delay.hands_over(&core)).then(|| (ctx.delay.clone(), record.clone()));
    let level = handed.as_ref().map(|_| core.clone());
    let started = std::time::Instant::now();
    let append = ctx.backend.enqueue(&core, record).await.inspect_err(|_| ctx.metrics.append_errors.inc())?;
    let metrics = ctx.metrics.clone();
    let append = async move {
        let r = append.await;
        metrics.append_done(started, r.is_ok());
        if let (Ok(at), Some((delays, record)), Some(level)) = (&r, handed, level) {
            delays.stored(&level, *at, record);
        }
        if let Some((tracer, id, publisher, core)) = traced {
            let (kind, detail) = match &r {
                Ok(pos) => (Kind::Stored, format!("{core}-{}@{}", pos.partition, pos.offset)),
                Err(e) => (Kind::Dropped, format!("not stored: {e}")),
            };
            tracer.emit(kind, &id, &publisher, detail);
        }
        r
    };
    if !message.retain || due_ms.is_some() {
        return Ok((append.boxed(), msg_id));
    }
    let retained = ctx.backend.put_state(StateStore::Retained, &message.topic, value);
    let ctx = ctx.clone();
    let done = async move {
        let (position, ()) = futures::try_join!(append, retained)?;
        let local = (!message.payload.is_empty()).then(|| message.clone());
        ctx.router.apply_retained(&message.topic, local);
        Ok(position)
    };
    Ok((done.boxed(), msg_id))
}
