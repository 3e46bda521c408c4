//! Delayed messages (SPEC §9): `$delayed/<seconds>/<topic>` and MQTT 5's
//! `__STARTDELIVERTIME`, up to 40 days, with every pending message in the core service.
//!
//! A delayed message is stored in a **delay level**: internal topic `<prefix>delay-<k>`
//! (`delay.partitions` partitions) holds each record for `2^k` ms after it was written. Because
//! the hold of a level is fixed, the times at which the records of a partition become ready grow
//! with their offsets, so each partition is a FIFO: its forwarder looks only at its head. A ready record with `r` ms left until its due
//! time goes to level `⌊log2 r⌋` (or to its topic when due), so each hop at least halves the
//! remaining time and a message takes at most one hop per level, plus repeated hops of the top
//! level when delays exceed its hold. The top level's hold is at most half the delay topics'
//! retention (`Config::delay_max_hold_ms`): a record never waits in a level longer than that,
//! and the other half is the outage the levels survive.
//!
//! - [`Delays`]: what the publish path needs (the clock, the level for a delay, refusals).
//! - [`lease`]: which gateway moves delayed messages (one at a time, taken over when it dies).
//! - [`forward`]: the forwarder of one level, its checkpoints and its recovery, which together
//!   deliver each delayed message exactly once across crashes.

pub mod forward;
pub mod lease;

use bytes::Bytes;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::backend::{CoreRecord, SharedCoreService};
use crate::config::Config;
use crate::metrics::DelayMetrics;
use crate::router::Router;

/// Longest delay: 40 days, in milliseconds.
pub const MAX_DELAY_MS: i64 = 40 * 86_400_000;
/// Longest delay of `$delayed/<seconds>/…`, in seconds.
pub const MAX_DELAY_SECS: u64 = 3_456_000;
/// Prefix of EMQX-compatible delayed topics.
pub const DELAYED_PREFIX: &str = "$delayed/";
/// User property (MQTT 5) and record header with the delivery time in epoch ms (RocketMQ's name).
pub const START_DELIVER_TIME: &str = "__STARTDELIVERTIME";
/// Lowest level: holds 128 ms. A message with less left waits at the head of its level.
pub const MIN_LEVEL: u32 = 7;
/// Highest possible level: holds 2^31 ms (24.9 days).
pub const MAX_LEVEL: u32 = 31;

/// Record headers of a delayed message (besides the message's own LMQ headers).
pub mod header {
    /// When the message is due, epoch ms.
    pub const DUE: &str = "lmqDue";
    /// When the record's hold in its level ends, epoch ms (absent: at once).
    pub const READY: &str = "lmqReady";
    /// The level record this one was forwarded from, `<level topic>-<partition>:<offset>`: what a forwarder
    /// looks for after a crash to know whether a record was already moved.
    pub const FROM: &str = "lmqDelayFrom";
}

// Defined in `labels`, so that `metrics` can label its counter without importing `delay`.
pub use crate::labels::Refused;

/// Split `$delayed/<seconds>/<topic>`: `None` for any other topic; the delay in ms and the
/// topic, or why it is refused.
pub fn parse_delayed_topic(topic: &str) -> Option<Result<(i64, &str), Refused>> {
    let rest = topic.strip_prefix(DELAYED_PREFIX)?;
    let Some((secs, target)) = rest.split_once('/') else { return Some(Err(Refused::Malformed)) };
    if secs.is_empty() || secs.len() > 10 || !secs.bytes().all(|b| b.is_ascii_digit()) || target.is_empty() {
        return Some(Err(Refused::Malformed));
    }
    let Ok(secs) = secs.parse::<u64>() else { return Some(Err(Refused::Malformed)) };
    if secs > MAX_DELAY_SECS {
        return Some(Err(Refused::TooLong));
    }
    Some(Ok((secs as i64 * 1000, target)))
}

/// Parse a `__STARTDELIVERTIME` value (epoch ms) at `now`: the due time, or why it is refused.
/// A time in the past means now.
pub fn parse_start_time(value: &str, now_ms: i64) -> Result<i64, Refused> {
    let due = value.trim().parse::<i64>().map_err(|_| Refused::Malformed)?;
    if due < 0 {
        return Err(Refused::Malformed);
    }
    if due.saturating_sub(now_ms) > MAX_DELAY_MS {
        return Err(Refused::TooLong);
    }
    Ok(due)
}

/// The time the delay code reads: the system clock plus an offset that tests (and drills) move
/// forward to see a 40-day delay through without waiting for it.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
    /// Woken when the clock is moved, so that waiting forwarders look again at once.
    moved: tokio::sync::Notify,
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        crate::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Move this gateway's delay clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
        self.moved.notify_waiters();
    }

    /// Completes when the clock is next moved.
    pub async fn moved(&self) {
        self.moved.notified().await
    }
}

/// The delay levels in use: `min ..= max`, and their topic names.
#[derive(Debug, Clone)]
pub struct Levels {
    pub min: u32,
    pub max: u32,
    prefix: String,
}

impl Levels {
    /// Levels whose top hold is at most `max_hold_ms`.
    pub fn new(reserved_prefix: &str, max_hold_ms: u64) -> Levels {
        let top = (63 - max_hold_ms.max(1).leading_zeros()).clamp(MIN_LEVEL + 1, MAX_LEVEL);
        Levels { min: MIN_LEVEL, max: top, prefix: format!("{reserved_prefix}delay-") }
    }

    pub fn topic(&self, level: u32) -> String {
        format!("{}{level:02}", self.prefix)
    }

    pub fn all(&self) -> impl Iterator<Item = u32> {
        self.min..=self.max
    }

    /// The level a record with `remaining_ms` left goes to.
    pub fn for_remaining(&self, remaining_ms: i64) -> u32 {
        let r = remaining_ms.max(1) as u64;
        (63 - r.leading_zeros()).clamp(self.min, self.max)
    }

    /// The level whose topic is `topic`, if it is one.
    pub fn of_topic(&self, topic: &str) -> Option<u32> {
        let k: u32 = topic.strip_prefix(&self.prefix)?.parse().ok()?;
        (self.min..=self.max).contains(&k).then_some(k)
    }
}

/// What a forwarder does with a record of its level at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not yet: look again at this time.
    Wait(i64),
    /// Due: write it to its topic.
    Deliver,
    /// Hold it further in this level.
    Move(u32),
}

/// The decision for a record of `level` held until `ready` and due at `due`. Less than the
/// lowest level's hold left: in the lowest level the record waits at the head until due (every
/// record there was written at most twice that hold before it is due, so the records behind
/// it are late by at most that much); in any other level it moves to the lowest. A higher
/// level never waits on a ready record: the records behind it may be ready and due already
/// (a level orders its records by ready time, not by due time), and a forwarder running
/// behind would meet one such record after another and fall further behind each time, up to
/// the level's hold.
pub fn decide(levels: &Levels, level: u32, ready: i64, due: i64, now: i64) -> Decision {
    if now < ready {
        return Decision::Wait(ready);
    }
    // Due times are whole milliseconds of a clock that reads whole milliseconds: delivering
    // only once the clock is past the due millisecond is never early, not even by a fraction.
    let left = due - now;
    if left < 0 {
        Decision::Deliver
    } else if left < 1 << levels.min && level <= levels.min {
        Decision::Wait(due + 1)
    } else {
        Decision::Move(levels.for_remaining(left))
    }
}

fn header_i64(rec: &CoreRecord, name: &str) -> Option<i64> {
    std::str::from_utf8(rec.header(name)?).ok()?.trim().parse().ok()
}

/// Due time of a level record: `lmqDue`, else `__STARTDELIVERTIME` (records written by
/// applications), else now.
pub fn due_of(rec: &CoreRecord) -> Option<i64> {
    header_i64(rec, header::DUE).or_else(|| header_i64(rec, START_DELIVER_TIME))
}

/// When a level record's hold ends (absent: at once).
pub fn ready_of(rec: &CoreRecord) -> i64 {
    header_i64(rec, header::READY).unwrap_or(i64::MIN)
}

/// Set the delay headers of `rec` for level `level` at `now` (replacing earlier ones).
pub fn mark(rec: &mut CoreRecord, level: u32, due: i64, now: i64, from: Option<String>) {
    rec.headers.retain(|(k, _)| k != header::DUE && k != header::READY && k != header::FROM);
    let ready = now.saturating_add(1 << level).min(due);
    rec.headers.push((header::DUE.into(), Bytes::from(due.to_string())));
    rec.headers.push((header::READY.into(), Bytes::from(ready.to_string())));
    if let Some(from) = from {
        rec.headers.push((header::FROM.into(), Bytes::from(from)));
    }
}

/// Delayed messages on this gateway: what the publish path and the admin API use, and the
/// forwarding task.
pub struct Delays {
    pub clock: Clock,
    /// Whether this gateway's forwarders run (it holds the lease).
    forwarding: std::sync::atomic::AtomicBool,
    /// Deliveries about to be made by this gateway's forwarders (`forward::DueHeads`).
    pub(crate) due_heads: forward::DueHeads,
    /// Records moved into levels by this gateway, for their forwarders (`forward::Handover`).
    pub(crate) handover: forward::Handover,
    pub levels: Levels,
    pub metrics: DelayMetrics,
}

impl Delays {
    pub fn new(config: &Config, metrics: DelayMetrics) -> Arc<Delays> {
        let levels = Levels::new(&config.topics.reserved_prefix, config.delay_max_hold_ms());
        for k in levels.all() {
            metrics.pending.with_label_values(&[&k.to_string()]).set(0);
        }
        Arc::new(Delays {
            clock: Clock::default(),
            forwarding: Default::default(),
            due_heads: Default::default(),
            handover: Default::default(),
            levels,
            metrics,
        })
    }

    /// Whether a record about to be written to `topic` should be handed to its forwarder once
    /// stored ([`Delays::stored`]): this gateway forwards, and `topic` is a level short enough
    /// that its forwarder takes the record within seconds (longer ones would hold the bounded
    /// hand-over for hours). A client flooding short delays fills the hand-over to its bound
    /// (64k records, 32 MiB); beyond it records are read back from the core service.
    pub fn hands_over(&self, topic: &str) -> bool {
        self.forwarding.load(Ordering::Acquire)
            && self.levels.of_topic(topic).is_some_and(|k| k <= forward::HANDOVER_MAX_LEVEL)
    }

    /// `record` was stored in level `topic` at `at`: its forwarder takes it from memory instead
    /// of reading it back from the core service.
    pub fn stored(&self, topic: &str, at: crate::backend::Position, record: CoreRecord) {
        let tp = crate::backend::TopicPartition::new(topic, at.partition);
        self.handover.put(crate::backend::Record { tp, offset: at.offset, record });
    }

    /// Turn `rec` (a message's record) into the record of its first level, for a message due at
    /// `due` published at `now` (delay clock); returns the level's topic.
    pub fn place(&self, rec: &mut CoreRecord, due: i64, now: i64) -> String {
        let level = self.levels.for_remaining(due - now);
        mark(rec, level, due, now, None);
        self.metrics.accepted.inc();
        self.levels.topic(level)
    }

    /// Count a refused delayed message.
    pub fn refused(&self, why: Refused) {
        self.metrics.refused.with_label_values(&[why.as_str()]).inc();
    }
}

impl Levels {
    /// The lease topic (`delay::lease`).
    pub fn lease_topic(&self) -> String {
        format!("{}lease", self.prefix)
    }
}

/// Create the level topics and the lease topic (one partition each; on Kafka with
/// `delay.retention_hours`), all at once. The gateway does this before it serves clients.
pub async fn create_topics(
    levels: &Levels,
    core: &SharedCoreService,
    config: &crate::config::DelayConfig,
) -> crate::backend::Result<()> {
    let retention_ms = config.retention_hours.saturating_mul(3_600_000);
    let mut topics: Vec<(String, u32)> = levels.all().map(|k| (levels.topic(k), config.partitions)).collect();
    topics.push((levels.lease_topic(), 1));
    futures::future::try_join_all(topics.iter().map(|(t, n)| core.ensure_topic_with_retention(t, *n, retention_ms)))
        .await?;
    Ok(())
}

/// Take part in moving delayed messages until `stop`: follow the lease; while this gateway
/// holds it, run one forwarder per level.
pub async fn run(
    delays: Arc<Delays>,
    core: SharedCoreService,
    router: Arc<Router>,
    config: crate::config::DelayConfig,
    gateway_id: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let lease_topic = delays.levels.lease_topic();
    if !config.enabled {
        return;
    }
    let single = core.kind() == "embedded";
    let instance = format!("{gateway_id}#{:016x}", rand::random::<u64>());
    let (lease, mut held) =
        lease::Lease::start(core.clone(), lease_topic.clone(), instance, &config, single, stop.clone());
    loop {
        // Wait until this gateway holds the lease.
        while held.borrow_and_update().is_none() {
            tokio::select! {
                r = held.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
        delays.metrics.holder.set(1);
        delays.forwarding.store(true, Ordering::Release);
        let term = stop.child_token();
        // Every partition of every level (a level may have more partitions than configured, if
        // it was created so earlier).
        let parts: Vec<(u32, u32)> = delays
            .levels
            .all()
            .flat_map(|k| {
                let n = core.partitions(&delays.levels.topic(k)).unwrap_or(config.partitions).max(1);
                (0..n).map(move |p| (k, p))
            })
            .collect();
        let tasks: Vec<_> = parts
            .into_iter()
            .map(|kp| {
                tokio::spawn(forward::run(
                    forward::Forwarder::new(kp, delays.clone(), core.clone(), router.clone(), lease.clone(), &config),
                    term.clone(),
                ))
            })
            .collect();
        while held.borrow_and_update().is_some() {
            tokio::select! {
                r = held.changed() => if r.is_err() { break },
                _ = stop.cancelled() => break,
            }
        }
        term.cancel();
        for t in tasks {
            let _ = t.await;
        }
        delays.forwarding.store(false, Ordering::Release);
        delays.handover.clear();
        delays.metrics.holder.set(0);
        for k in delays.levels.all() {
            delays.metrics.pending.with_label_values(&[&k.to_string()]).set(0);
        }
        if stop.is_cancelled() {
            lease.release(&core, &lease_topic).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delayed_topics_parse_and_refuse() {
        assert_eq!(parse_delayed_topic("a/b"), None);
        assert_eq!(parse_delayed_topic("$delayed/10/a/b"), Some(Ok((10_000, "a/b"))));
        assert_eq!(parse_delayed_topic("$delayed/0/a"), Some(Ok((0, "a"))));
        assert_eq!(parse_delayed_topic("$delayed/3456000/a"), Some(Ok((3_456_000_000, "a"))));
        assert_eq!(parse_delayed_topic("$delayed/3456001/a"), Some(Err(Refused::TooLong)));
        assert_eq!(parse_delayed_topic("$delayed/99999999999/a"), Some(Err(Refused::Malformed)));
        for bad in [
            "$delayed/",
            "$delayed/10",
            "$delayed/10/",
            "$delayed/x/a",
            "$delayed/-1/a",
            "$delayed//a",
            "$delayed/+1/a",
        ] {
            assert_eq!(parse_delayed_topic(bad), Some(Err(Refused::Malformed)), "{bad}");
        }
    }

    #[test]
    fn start_times_parse_and_refuse() {
        let now = 1_000_000;
        assert_eq!(parse_start_time("1005000", now), Ok(1_005_000));
        assert_eq!(parse_start_time("5", now), Ok(5));
        assert_eq!(parse_start_time(&(now + MAX_DELAY_MS).to_string(), now), Ok(now + MAX_DELAY_MS));
        assert_eq!(parse_start_time(&(now + MAX_DELAY_MS + 1).to_string(), now), Err(Refused::TooLong));
        for bad in ["", "soon", "1.5", "-3", "99999999999999999999"] {
            assert_eq!(parse_start_time(bad, now), Err(Refused::Malformed), "{bad}");
        }
    }

    #[test]
    fn levels_halve_what_is_left_and_stop_at_the_top_hold() {
        let levels = Levels::new("lmq-", 45 * 86_400_000);
        assert_eq!((levels.min, levels.max), (7, 31));
        assert_eq!(levels.topic(7), "lmq-delay-07");
        assert_eq!(levels.of_topic("lmq-delay-31"), Some(31));
        assert_eq!(levels.of_topic("lmq-delay-32"), None);
        assert_eq!(levels.for_remaining(1000), 9);
        assert_eq!(levels.for_remaining(1), 7);
        assert_eq!(levels.for_remaining(MAX_DELAY_MS), 31);
        // 36 h of retention: holds up to 2^26 ms (18.6 h).
        assert_eq!(Levels::new("lmq-", 36 * 3_600_000).max, 26);
    }

    /// A ready record with less than the lowest hold left waits only at the head of the lowest
    /// level; elsewhere it moves there and the records behind it go on.
    #[test]
    fn only_the_lowest_level_waits_for_a_due_time() {
        let levels = Levels::new("lmq-", 45 * 86_400_000);
        assert_eq!(decide(&levels, 7, 1_000, 1_100, 1_000), Decision::Wait(1_101));
        assert_eq!(decide(&levels, 11, 1_000, 1_100, 1_000), Decision::Move(7));
        assert_eq!(decide(&levels, 11, 1_000, 1_100, 1_050), Decision::Move(7));
        assert_eq!(decide(&levels, 11, 1_000, 1_100, 1_100), Decision::Move(7));
        assert_eq!(decide(&levels, 11, 1_000, 1_100, 1_101), Decision::Deliver);
        assert_eq!(decide(&levels, 11, 1_000, 3_000, 900), Decision::Wait(1_000));
        assert_eq!(decide(&levels, 11, 1_000, 3_000, 1_000), Decision::Move(10));
    }

    /// Follow one message through the levels with a forwarder that acts exactly when a hold
    /// ends: it is delivered exactly at its due time, in few hops.
    #[test]
    fn a_message_reaches_its_due_time_through_the_levels() {
        for (levels, delay) in [
            (Levels::new("lmq-", 45 * 86_400_000), MAX_DELAY_MS),
            (Levels::new("lmq-", 45 * 86_400_000), 1_000),
            (Levels::new("lmq-", 45 * 86_400_000), 3_000),
            (Levels::new("lmq-", 72 * 3_600_000 / 2), MAX_DELAY_MS),
        ] {
            let start = 1_700_000_000_000;
            let due = start + delay;
            let mut now = start;
            let mut level = levels.for_remaining(due - now);
            let mut ready = now.saturating_add(1 << level).min(due);
            let mut hops = 1;
            loop {
                match decide(&levels, level, ready, due, now) {
                    Decision::Wait(t) => now = t,
                    Decision::Deliver => break,
                    Decision::Move(k) => {
                        assert!(k < level || k == levels.max, "levels go down, or repeat the top");
                        level = k;
                        ready = now.saturating_add(1 << k).min(due);
                        hops += 1;
                    }
                }
            }
            assert_eq!(now, due + 1, "delivered in the millisecond after the due one");
            let top_repeats = (delay >> levels.max) + 1;
            assert!(hops <= (levels.max - levels.min + 1) as i64 + top_repeats, "{hops} hops");
        }
    }
}
