//! The forwarder of one partition of a delay level: reads its head, and moves each ready
//! record to a lower level or, once due, to its topic; exactly once across crashes. Each
//! partition of a level is first-in first-out on its own (records are held a fixed time from
//! when they were written, whichever partition they went to).
//!
//! Before a batch is written anywhere, its **checkpoint** is saved in the `Delay` state store
//! (key = `<level topic>-<partition>`): the offsets `[next, to)` being moved, the time, and the
//! topics written to. Every forwarded record carries `lmqDelayFrom = <level topic>-<partition>:<offset>`. A batch that
//! completes needs no second write: the next checkpoint starts where it ended. After a crash,
//! a failed write or a takeover, recovery reads the checkpoint and, when its range is not
//! empty, looks in each of its topics from the checkpoint's time (less
//! [`crate::query::SKEW_MS`], for time indexes kept by the broker's clock) for the records that
//! carry its `lmqDelayFrom` marks: those were written; the others of the range are written
//! now. Only the head of the level is in memory: at most `delay.batch` records and 1 MiB
//! while they are ready or wait less than a second (the records behind a waiting head are read
//! while it waits, off the delivery's path), one record (or 64 KiB) while it waits longer.
//!
//! Due and ready times are read on the delay clock ([`super::Clock`], which tests move
//! forward); record timestamps and checkpoint times are wall-clock time, because the core
//! service keeps its time indexes by them and may refuse timestamps far ahead of its own clock
//! (Kafka 4: `log.message.timestamp.after.max.ms`, one hour by default).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{decide, due_of, header, lease::Lease, mark, ready_of, Decision, Delays, START_DELIVER_TIME};
use crate::backend::{BackendError, CoreRecord, Record, SharedCoreService, StateStore, TopicPartition};
use crate::router::mapping::{self, header as lmq};
use crate::router::Router;

/// Longest a forwarder sleeps before it looks again (a moved clock, a lost lease).
const MAX_SLEEP_MS: i64 = 1000;
/// While a head waits, the pending gauge is set from the partition's end (one end-offset
/// request) at most this often.
const PENDING_REFRESH: Duration = Duration::from_secs(5);
/// Bytes of head records a forwarder keeps (at least one record): with every level busy, the
/// forwarders hold at most about this much times the number of levels.
const HEAD_BYTES: usize = 1 << 20;
/// Longest a delivery waits for earlier ones of other forwarders while none of them makes
/// progress (one stuck on the core service holds the others back no longer: the rest of the
/// batch then goes out at once).
const MAX_ORDER_WAIT: Duration = Duration::from_millis(1500);
/// Bytes of records behind a head that waits longer than a second that a forwarder keeps
/// (more: it keeps only the head and reads the rest again when it is ready).
const WAITING_BYTES: usize = 64 << 10;
/// Deliveries late by more than this (every gateway was down, or the forwarders fell behind)
/// go out in due order across forwarders; those due more recently are written at once.
const ORDER_AFTER_MS: i64 = 2000;
/// Deliveries due within this of each other may go out in either order (larger groups per
/// write when many are overdue).
const ORDER_SLACK_MS: i64 = 50;
/// A waiting head with at least this long to wait (and less than [`MAX_SLEEP_MS`]) has the
/// records behind it read meanwhile.
const PREFETCH_MIN_MS: i64 = 200;
/// Records recovery reads at most to find what was already written.
const SCAN_MAX_RECORDS: usize = 5_000_000;

/// What is being moved (the `Delay` state store's value for a level).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// First level offset of the batch.
    pub next: u64,
    /// End of the batch (exclusive): offsets `[next, to)` may be written, partly or wholly.
    pub to: u64,
    /// When the checkpoint was written (epoch ms, wall clock: recovery looks it up in the time
    /// indexes of the topics, which hold the records' wall-clock timestamps).
    pub at: i64,
    /// Topics the batch writes to.
    pub dests: Vec<String>,
}

/// One record's way on.
enum Out {
    Wait(i64),
    /// Write `record` to `topic`; `retained`: also the retained store (`Some(None)`: delete).
    Write {
        topic: String,
        record: CoreRecord,
        retained: Option<(String, Option<bytes::Bytes>)>,
        /// Due time of a delivery (`None`: moved to a level).
        due: Option<i64>,
    },
    /// Cannot be delivered (no due time, topic refused): counted and skipped.
    Drop(&'static str),
}

impl Out {
    fn due(&self) -> Option<i64> {
        match self {
            Out::Write { due, .. } => *due,
            _ => None,
        }
    }
}

/// What each forwarder of this gateway delivers next, so that all of them deliver in due order
/// (after an outage many messages are overdue at once, spread over levels and partitions).
/// A forwarder announces the due time of its next delivery while it writes a batch, and the
/// time its head is ready (or due, in the last 128 ms) while it waits for it; a forwarder with
/// nothing to read announces nothing. Its first read (after it starts, or after the delay clock
/// was moved) may find overdue records: while it reads, it announces the earliest time of all. A delivery waits while another forwarder announced an
/// earlier time. Only writing forwarders wait, and the one with the earliest announcement
/// among them is never held back by a writing one: no deadlock.
#[derive(Default)]
pub struct DueHeads {
    heads: parking_lot::Mutex<std::collections::HashMap<String, i64>>,
}

impl DueHeads {
    fn offer(&self, key: &str, at: Option<i64>) {
        let mut heads = self.heads.lock();
        match at {
            Some(t) => {
                heads.insert(key.to_owned(), t);
            }
            None => {
                heads.remove(key);
            }
        }
    }

    /// The earliest announcement of the other forwarders (`i64::MAX`: none).
    fn floor(&self, key: &str) -> i64 {
        let heads = self.heads.lock();
        heads.iter().filter(|(k, _)| k.as_str() != key).map(|(_, t)| *t).min().unwrap_or(i64::MAX)
    }
}

/// Records this gateway's forwarders moved into a level, by where they landed: the forwarder
/// of that partition takes them from here instead of reading them back from the core service
/// (which on Kafka and RocketMQ costs a round trip per hop), and is woken when one arrives.
/// Bounded: beyond [`Handover::MAX_RECORDS`] or [`Handover::MAX_BYTES`] nothing more is kept
/// (the forwarder reads those from the core service as usual).
#[derive(Default)]
pub struct Handover {
    inner: parking_lot::Mutex<HandoverInner>,
}

#[derive(Default)]
struct HandoverInner {
    records: std::collections::HashMap<TopicPartition, std::collections::BTreeMap<u64, Arc<Record>>>,
    wake: std::collections::HashMap<TopicPartition, Arc<tokio::sync::Notify>>,
    count: usize,
    bytes: usize,
}

/// Highest level whose records are handed over ([`super::Delays::hands_over`]): its hold is
/// about 4 s.
pub const HANDOVER_MAX_LEVEL: u32 = 12;

impl Handover {
    const MAX_RECORDS: usize = 65_536;
    const MAX_BYTES: usize = 32 << 20;

    /// Forget every record (this gateway stopped forwarding).
    pub(super) fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.records.clear();
        inner.count = 0;
        inner.bytes = 0;
    }

    fn wake(&self, tp: &TopicPartition) -> Arc<tokio::sync::Notify> {
        self.inner.lock().wake.entry(tp.clone()).or_default().clone()
    }

    pub(super) fn put(&self, r: Record) {
        let size = r.record.memory_size();
        let mut inner = self.inner.lock();
        if inner.count >= Self::MAX_RECORDS || inner.bytes + size > Self::MAX_BYTES {
            return;
        }
        inner.count += 1;
        inner.bytes += size;
        let tp = r.tp.clone();
        inner.records.entry(tp.clone()).or_default().insert(r.offset, Arc::new(r));
        if let Some(w) = inner.wake.get(&tp) {
            w.notify_one();
        }
    }

    /// The records of `tp` from `from` on without a gap, at most `max`; those below `from`
    /// are dropped.
    fn take(&self, tp: &TopicPartition, from: u64, max: usize) -> Vec<Arc<Record>> {
        let mut inner = self.inner.lock();
        let HandoverInner { records, count, bytes, .. } = &mut *inner;
        let Some(held) = records.get_mut(tp) else { return Vec::new() };
        let mut keep = held.split_off(&from);
        for r in held.values() {
            *count -= 1;
            *bytes -= r.record.memory_size();
        }
        let mut out = Vec::new();
        let mut at = from;
        while out.len() < max {
            let Some(r) = keep.remove(&at) else { break };
            *count -= 1;
            *bytes -= r.record.memory_size();
            out.push(r);
            at += 1;
        }
        *held = keep;
        out
    }
}

pub struct Forwarder {
    level: u32,
    partition: u32,
    tp: TopicPartition,
    delays: Arc<Delays>,
    core: SharedCoreService,
    router: Arc<Router>,
    lease: Arc<Lease>,
    batch: usize,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Core(#[from] BackendError),
    #[error("no answer from the core service within {0:?}")]
    Timeout(Duration),
    #[error("lease lost")]
    Lease,
}

impl Forwarder {
    pub fn new(
        (level, partition): (u32, u32),
        delays: Arc<Delays>,
        core: SharedCoreService,
        router: Arc<Router>,
        lease: Arc<Lease>,
        config: &crate::config::DelayConfig,
    ) -> Forwarder {
        let tp = TopicPartition::new(delays.levels.topic(level), partition);
        Forwarder {
            level,
            partition,
            tp,
            delays,
            core,
            router,
            lease,
            batch: config.batch.max(1),
            timeout: Duration::from_secs(config.timeout_secs.max(1)),
        }
    }

    /// Checkpoint key and mark prefix: the level topic and partition (`lmq-delay-09-2`), so
    /// gateway groups with different reserved prefixes on one cluster never mix them up.
    fn key(&self) -> String {
        self.tp.to_string()
    }

    async fn within<T>(&self, f: impl std::future::Future<Output = Result<T, BackendError>>) -> Result<T, Failed> {
        tokio::time::timeout(self.timeout, f).await.map_err(|_| Failed::Timeout(self.timeout))?.map_err(Failed::from)
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, Failed> {
        let raw = self.within(self.core.get_state(StateStore::Delay, &self.key())).await?;
        Ok(raw.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn save(&self, cp: &Checkpoint) -> Result<(), Failed> {
        if !self.lease.valid() {
            return Err(Failed::Lease);
        }
        let value =
            serde_json::to_vec(cp).map_err(|e| Failed::Core(BackendError::storage_from("delay checkpoint", e)))?;
        self.within(self.core.put_state(StateStore::Delay, &self.key(), Some(value.into()))).await
    }

    /// What to do with `r` at `now`.
    async fn out(&self, r: &Record, now: i64) -> Out {
        let Some(due) = due_of(&r.record) else { return Out::Drop("no_due_time") };
        if due.saturating_sub(now) > super::MAX_DELAY_MS + 86_400_000 {
            // Written by an application past the 40 days (with a day of clock margin).
            return Out::Drop("too_far");
        }
        let from = format!("{}:{}", self.key(), r.offset);
        match decide(&self.delays.levels, self.level, ready_of(&r.record), due, now) {
            Decision::Wait(t) => Out::Wait(t),
            Decision::Move(k) => {
                let mut record = r.record.clone();
                mark(&mut record, k, due, now, Some(from));
                record.timestamp_ms = crate::now_ms();
                Out::Write { topic: self.delays.levels.topic(k), record, retained: None, due: None }
            }
            Decision::Deliver => {
                let Some(topic) = r.record.header(lmq::TOPIC).and_then(|t| std::str::from_utf8(t).ok()) else {
                    return Out::Drop("no_topic");
                };
                let Ok(core) = self.router.topics().resolve(crate::router::topic::parent(topic)) else {
                    return Out::Drop("topic_refused");
                };
                if crate::router::topic::validate_name(topic).is_err() {
                    return Out::Drop("topic_refused");
                }
                if let Err(e) = self.router.ensure_for_publish(&core, topic).await {
                    tracing::warn!(topic, error = %e, "cannot deliver a delayed message");
                    return Out::Drop("topic_refused");
                }
                let mut record = r.record.clone();
                record.headers.retain(|(k, _)| k != header::DUE && k != header::READY && k != START_DELIVER_TIME);
                record.headers.retain(|(k, _)| k != header::FROM);
                record.headers.push((header::FROM.into(), bytes::Bytes::from(from)));
                record.timestamp_ms = crate::now_ms();
                let retained = (record.header(lmq::RETAIN).map(|v| &v[..]) == Some(b"true")).then(|| {
                    let value = (!record.value.is_empty()).then(|| mapping::encode_record(&record));
                    (topic.to_owned(), value)
                });
                Out::Write { topic: core.name.to_string(), record, retained, due: Some(due) }
            }
        }
    }

    /// Write a batch of decided records in order and wait until all are durable. A record the
    /// core service refuses for good is dropped ([`Forwarder::rejected`]).
    async fn write(&self, outs: Vec<Out>) -> Result<(), Failed> {
        let now = self.delays.clock.now_ms();
        let mut acks = Vec::with_capacity(outs.len());
        for out in outs {
            match out {
                Out::Write { topic, record, retained, due } => {
                    // A move into a level: handed to that level's forwarder once stored.
                    let is_level = self.delays.levels.of_topic(&topic).is_some();
                    let copy = is_level.then(|| self.delays.hands_over(&topic).then(|| record.clone()));
                    match self.within(self.core.enqueue(&topic, record)).await {
                        Ok(ack) => acks.push((topic, copy, retained, due, ack)),
                        Err(Failed::Core(e @ BackendError::Rejected { .. })) => self.rejected(&topic, &e),
                        Err(e) => return Err(e),
                    }
                }
                Out::Drop(why) => self.delays.metrics.dropped.with_label_values(&[why]).inc(),
                Out::Wait(_) => {}
            }
        }
        for (topic, copy, retained, due, ack) in acks {
            let at = match self.within(ack).await {
                Ok(at) => at,
                Err(Failed::Core(e @ BackendError::Rejected { .. })) => {
                    self.rejected(&topic, &e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some((key, value)) = retained {
                self.within(self.core.put_state(StateStore::Retained, &key, value)).await?;
            }
            let to = if copy.is_some() { "level" } else { "topic" };
            self.delays.metrics.forwarded.with_label_values(&[to]).inc();
            if let Some(due) = due {
                self.delays.metrics.lateness.observe((now - due).max(0) as f64 / 1000.0);
            }
            if let Some(Some(record)) = copy {
                self.delays.stored(&topic, at, record);
            }
        }
        Ok(())
    }

    /// A record the core service refuses for good (too large for its topic, not authorised):
    /// counted and skipped, so that it does not hold up the level forever.
    fn rejected(&self, topic: &str, error: &BackendError) {
        tracing::warn!(
            level = self.level,
            partition = self.partition,
            topic,
            error = %error,
            "the core service refuses a delayed message for good; dropped"
        );
        self.delays.metrics.dropped.with_label_values(&["rejected"]).inc();
    }

    /// Write a batch: moves to levels at once, deliveries in due order, in groups: each group is
    /// what is due no later than every other forwarder's announcement ([`DueHeads`]) plus
    /// [`ORDER_SLACK_MS`], so deliveries of all forwarders interleave by due time.
    async fn write_in_order(&self, outs: Vec<Out>) -> Result<(), Failed> {
        // Moves, and deliveries not yet [`ORDER_AFTER_MS`] late, go out at once.
        let overdue = self.delays.clock.now_ms() - ORDER_AFTER_MS;
        let (mut deliveries, others): (Vec<Out>, Vec<Out>) =
            outs.into_iter().partition(|o| o.due().is_some_and(|d| d < overdue));
        self.write(others).await?;
        deliveries.sort_by_key(|o| o.due());
        let mut rest = std::collections::VecDeque::from(deliveries);
        // Since when the earliest other announcement has not moved.
        let mut stuck = (i64::MIN, tokio::time::Instant::now());
        while let Some(first) = rest.front().and_then(Out::due) {
            self.delays.due_heads.offer(&self.key(), Some(first));
            let floor = self.delays.due_heads.floor(&self.key());
            if floor != stuck.0 {
                stuck = (floor, tokio::time::Instant::now());
            }
            let limit = floor.saturating_add(ORDER_SLACK_MS);
            let n = rest.iter().take_while(|o| o.due().is_some_and(|d| d <= limit)).count();
            if n > 0 {
                self.write(rest.drain(..n).collect()).await?;
            } else if stuck.1.elapsed() < MAX_ORDER_WAIT {
                if !self.lease.valid() {
                    return Err(Failed::Lease);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else {
                // Held back too long (another forwarder stuck on the core service): go on.
                return self.write(rest.into_iter().collect()).await;
            }
        }
        Ok(())
    }

    /// Finish what the checkpoint says may be half done; returns the offset to go on from.
    async fn recover(&self) -> Result<u64, Failed> {
        let Some(cp) = self.checkpoint().await? else { return Ok(0) };
        if cp.to <= cp.next {
            return Ok(cp.next);
        }
        let written = self.written(&cp).await?;
        let mut next = cp.next;
        let mut redo = 0usize;
        while next < cp.to {
            let got = self.within(self.core.fetch(&self.tp, next, self.batch)).await?;
            if got.records.is_empty() {
                break;
            }
            next = got.next_offset.max(next + 1);
            let mut outs = Vec::new();
            for r in got.records.iter().filter(|r| r.offset < cp.to && !written.contains(&r.offset)) {
                let mut out = self.out(r, self.delays.clock.now_ms()).await;
                while let Out::Wait(t) = out {
                    tokio::time::sleep(Duration::from_millis(
                        (t - self.delays.clock.now_ms()).clamp(1, MAX_SLEEP_MS) as u64
                    ))
                    .await;
                    out = self.out(r, self.delays.clock.now_ms()).await;
                }
                outs.push(out);
            }
            redo += outs.len();
            if !self.lease.valid() {
                return Err(Failed::Lease);
            }
            self.write(outs).await?;
        }
        if redo > 0 || !written.is_empty() {
            tracing::info!(
                level = self.level,
                partition = self.partition,
                already = written.len(),
                written_now = redo,
                "delayed messages of an unfinished batch recovered"
            );
        }
        let done = Checkpoint { next: cp.to, to: cp.to, at: crate::now_ms(), dests: Vec::new() };
        self.save(&done).await?;
        Ok(cp.to)
    }

    /// Offsets of the checkpoint's range that some topic of the checkpoint already holds.
    async fn written(&self, cp: &Checkpoint) -> Result<HashSet<u64>, Failed> {
        let mark = format!("{}:", self.key());
        let mut found = HashSet::new();
        let mut scanned = 0usize;
        for dest in &cp.dests {
            self.within(self.core.ensure_topic(dest, 1)).await?;
            let partitions = self.core.partitions(dest)?;
            for p in 0..partitions {
                let tp = TopicPartition::new(dest.as_str(), p);
                let from = crate::backend::offset_for_time(
                    self.core.as_ref(),
                    &tp,
                    cp.at.saturating_sub(crate::query::SKEW_MS),
                );
                let mut at = self.within(from).await?;
                let end = self.within(self.core.end_offset(&tp)).await?;
                while at < end && scanned < SCAN_MAX_RECORDS {
                    let got = self.within(self.core.fetch(&tp, at, 1000)).await?;
                    if got.records.is_empty() {
                        break;
                    }
                    scanned += got.records.len();
                    at = got.next_offset.max(at + 1);
                    for r in &got.records {
                        let Some(from) = r.record.header(header::FROM) else { continue };
                        let Some(offset) = std::str::from_utf8(from).ok().and_then(|f| f.strip_prefix(&mark)) else {
                            continue;
                        };
                        if let Ok(o) = offset.parse::<u64>() {
                            if (cp.next..cp.to).contains(&o) {
                                found.insert(o);
                            }
                        }
                    }
                }
            }
        }
        if scanned >= SCAN_MAX_RECORDS {
            tracing::warn!(
                level = self.level,
                partition = self.partition,
                "recovery scan bound reached; some delayed messages may be written twice"
            );
        }
        Ok(found)
    }

    /// Move ready records until the lease is lost or `stop`.
    async fn forward(&self, next: u64, stop: &tokio_util::sync::CancellationToken) -> Result<(), Failed> {
        let pending = self.delays.metrics.pending.with_label_values(&[&self.level.to_string()]);
        // This partition's share of the level's gauge, taken back when it stops.
        let mut counted = 0i64;
        let result = self.forward_from(next, stop, &pending, &mut counted).await;
        pending.sub(counted);
        self.delays.due_heads.offer(&self.key(), None);
        result
    }

    async fn forward_from(
        &self,
        mut next: u64,
        stop: &tokio_util::sync::CancellationToken,
        pending: &prometheus::IntGauge,
        counted: &mut i64,
    ) -> Result<(), Failed> {
        let mut heads: std::collections::VecDeque<Arc<Record>> = Default::default();
        // An empty partition is looked at again within half its hold (at most 1 s, at least
        // 100 ms): a record written meanwhile is seen before it is ready.
        let idle = Duration::from_millis(((1u64 << self.level.min(20)) / 2).clamp(100, MAX_SLEEP_MS as u64));
        let wake = self.delays.handover.wake(&self.tp);
        // The end of `heads` last read on from (once per position).
        let mut topped_up = None;
        // When `pending` was last set from the partition's end.
        let mut pending_at = tokio::time::Instant::now();
        // The partition has not been read since the forwarder started or the clock was moved:
        // it may hold overdue records nobody announced yet.
        let mut unseen = true;

        loop {
            if stop.is_cancelled() || !self.lease.valid() {
                return Err(Failed::Lease);
            }
            if heads.is_empty() {
                // Moved here by this gateway: no need to read them back.
                heads.extend(self.delays.handover.take(&self.tp, next, self.batch));
            }
            if heads.is_empty() {
                if unseen {
                    // What this read finds may be overdue: the others hold their overdue
                    // deliveries back until it is announced.
                    self.delays.due_heads.offer(&self.key(), Some(i64::MIN));
                }
                let got = self.within(self.core.fetch(&self.tp, next, self.batch)).await?;
                unseen = false;
                let now_pending = got.high_watermark.saturating_sub(next) as i64;
                pending.add(now_pending - *counted);
                *counted = now_pending;
                pending_at = tokio::time::Instant::now();
                if got.records.is_empty() {
                    next = next.max(got.next_offset);
                    self.delays.due_heads.offer(&self.key(), None);
                    tokio::select! {
                        _ = tokio::time::sleep(idle) => {}
                        _ = wake.notified() => {}
                        _ = self.delays.clock.moved() => unseen = true,
                        _ = stop.cancelled() => return Ok(()),
                    }
                    continue;
                }
                let mut bytes = 0;
                heads.extend(got.records.into_iter().take_while(|r| {
                    let first = bytes == 0;
                    bytes += r.record.memory_size();
                    first || bytes <= HEAD_BYTES
                }));
            }
            let now = self.delays.clock.now_ms();
            // Read on behind the head (up to the batch) while it waits long enough for a read
            // (off the delivery's path: a read that would outlast the wait is given up), or when
            // it is overdue (so that deliveries within the batch can be sorted by due time). A
            // head ready on time goes out without waiting for a read.
            let last = heads.back().map_or(next, |r| r.offset + 1);
            if heads.len() < self.batch && topped_up != Some(last) {
                let budget = match self.out(&heads[0], now).await {
                    Out::Wait(t) if (PREFETCH_MIN_MS..MAX_SLEEP_MS).contains(&(t - now)) => {
                        Some(Duration::from_millis((t - now - PREFETCH_MIN_MS / 2) as u64))
                    }
                    Out::Wait(_) => None,
                    out => out.due().is_some_and(|d| d < now - ORDER_AFTER_MS).then_some(self.timeout),
                };
                if let Some(budget) = budget {
                    topped_up = Some(last);
                    let read = self.within(self.core.fetch(&self.tp, last, self.batch - heads.len()));
                    if let Ok(got) = tokio::time::timeout(budget, read).await {
                        let got = got?;
                        let mut bytes: usize = heads.iter().map(|r| r.record.memory_size()).sum();
                        heads.extend(got.records.into_iter().filter(|r| r.offset >= last).take_while(|r| {
                            bytes += r.record.memory_size();
                            bytes <= HEAD_BYTES
                        }));
                    }
                }
            }
            let mut outs = Vec::new();
            let mut wait = None;
            for r in heads.iter().take(self.batch) {
                match self.out(r, now).await {
                    Out::Wait(t) => {
                        wait = Some(t);
                        break;
                    }
                    out => outs.push(out),
                }
            }
            if outs.is_empty() {
                // A waiting head is not read again: count what was written behind it.
                if pending_at.elapsed() >= PENDING_REFRESH {
                    if let Ok(end) = self.within(self.core.end_offset(&self.tp)).await {
                        let now_pending = end.saturating_sub(next) as i64;
                        pending.add(now_pending - *counted);
                        *counted = now_pending;
                    }
                    pending_at = tokio::time::Instant::now();
                }
                self.delays.due_heads.offer(&self.key(), wait);
                let sleep = wait.map_or(MAX_SLEEP_MS, |t| (t - now).clamp(1, MAX_SLEEP_MS));
                if sleep >= MAX_SLEEP_MS && heads.iter().map(|r| r.record.memory_size()).sum::<usize>() > WAITING_BYTES
                {
                    // Long wait: hold only the head.
                    heads.truncate(1);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(sleep as u64)) => {}
                    _ = self.delays.clock.moved() => {}
                    _ = stop.cancelled() => return Ok(()),
                }
                continue;
            }
            // Announce the batch's earliest delivery before anything else, so that the other
            // forwarders hold later ones back (`write_in_order`).
            self.delays.due_heads.offer(&self.key(), outs.iter().filter_map(Out::due).min());
            let taken: Vec<Arc<Record>> = heads.drain(..outs.len()).collect();
            let to = taken.last().map_or(next, |r| r.offset + 1);
            let dests: BTreeSet<String> = outs
                .iter()
                .filter_map(|o| match o {
                    Out::Write { topic, .. } => Some(topic.clone()),
                    _ => None,
                })
                .collect();
            let cp = Checkpoint { next, to, at: crate::now_ms(), dests: dests.into_iter().collect() };
            self.save(&cp).await?;
            if let Err(e) = self.write_in_order(outs).await {
                // Some of the batch may be written: recovery sorts it out from the checkpoint.
                tracing::warn!(level = self.level,
                partition = self.partition, error = %e, "writing delayed messages failed");
                return Err(e);
            }
            // What is left is ready no earlier than the next head.
            let rest = heads.front().map(|r| ready_of(&r.record));
            self.delays.due_heads.offer(&self.key(), rest);
            next = to;
        }
    }
}

/// Run one level's forwarder while this gateway holds the lease.
pub async fn run(f: Forwarder, stop: tokio_util::sync::CancellationToken) {
    // Failures back off (0.5 s doubling to 8 s) so that a hundred forwarders do not hammer a
    // core service that is down; an attempt that ran for a while starts over at 0.5 s.
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = tokio::time::Instant::now();
        let result = match f.recover().await {
            Ok(next) => f.forward(next, &stop).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(Failed::Lease) if stop.is_cancelled() => return,
            Err(Failed::Lease) => {}
            Err(e) => {
                tracing::warn!(level = f.level, partition = f.partition, error = %e, "delayed-message forwarder failed; retrying")
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(500);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(8));
    }
}
