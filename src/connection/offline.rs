//! LMQ's legacy offline pull (SPEC §10): a client whose stored session comes back publishes
//! `$SYS/getOfflineMsg` (`{"maxPushNum":N,"pushOrder":"ASC"|"DESC"}`) and gets its offline
//! messages only when it asks, at most [`PULL_MAX`] per request and [`PULLS_PER_SECOND`]
//! requests per second.
//!
//! The *offline backlog* of a partition is what the session had not acknowledged when it
//! switched to pull mode: from its committed position to the end of the log then (at most
//! the window after CONNECT, and nothing of it was delivered before). A restored session holds
//! its read-back for `mqtt.offline_pull_window_ms` after CONNECT (or until the client
//! publishes anything else); a pull request within that window switches the connection to
//! pull mode: the backlog is marked held in the partition's cursor
//! ([`crate::session::state::Held`]) and only requests deliver from it, while everything
//! after it is read and delivered live as usual. A pulled message is an ordinary QoS 1/2
//! delivery: the committed position moves only with its acknowledgement.
//!
//! This module decides and reads; it sends nothing itself but the request's acknowledgement
//! (the pulled messages join the connection's pending queue). It must not read a backlog
//! whole: each request reads the core service in windows of [`PULL_FETCH`] records and looks
//! at [`PULL_SCAN_MAX`] records at most.

use super::appends::Appends;
use super::waiting::{Resume, Step};
use super::*;
use crate::labels::Refusal;
use crate::session::state::Held;

/// Client → gateway: deliver some offline messages (not stored, not subject to the ACL).
pub(super) const SYS_GET_OFFLINE_MSG: &str = "$SYS/getOfflineMsg";
/// Messages one request delivers at most (LMQ's limit), also when it asks for more.
pub(super) const PULL_MAX: usize = 30;
/// Requests served per connection in any one second; beyond, refused (MQTT 5: 0x97).
pub(super) const PULLS_PER_SECOND: usize = 5;
/// Records read per fetch from the core service.
const PULL_FETCH: usize = 64;
/// Records one request looks at at most (a backlog of mostly non-matching records is pulled
/// over several requests instead of one long read).
const PULL_SCAN_MAX: usize = 4096;

/// Where the connection stands with respect to offline pull.
pub(super) enum Mode {
    /// Within the window after CONNECT. `held`: a restored session whose read-back waits,
    /// with the router's positions at CONNECT (the end of its backlog per partition).
    Deciding { deadline: Instant, held: Option<Vec<(TopicPartition, u64)>> },
    /// The backlog is pushed (window over, or pull disabled); requests are refused.
    Push,
    /// Pull mode: the backlog is delivered only on request.
    Pull,
}

pub(super) struct OfflinePull {
    mode: Mode,
    /// When the requests of the last second were served (at most [`PULLS_PER_SECOND`]).
    recent: VecDeque<Instant>,
}

/// A request's JSON body (LMQ names; other fields are ignored).
#[derive(Debug, serde::Deserialize)]
struct Request {
    #[serde(rename = "maxPushNum")]
    max_push_num: Option<i64>,
    #[serde(rename = "pushOrder")]
    push_order: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// How many messages and in which order: `maxPushNum` capped at [`PULL_MAX`] (missing or
/// ≤ 0: [`PULL_MAX`]), `pushOrder` ASC (the default) or DESC. `None`: not such a request.
fn parse_request(payload: &[u8]) -> Option<(usize, Order)> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Some((PULL_MAX, Order::Asc));
    }
    let r: Request = serde_json::from_slice(payload).ok()?;
    let order = match r.push_order.as_deref() {
        None => Order::Asc,
        Some(o) if o.eq_ignore_ascii_case("asc") => Order::Asc,
        Some(o) if o.eq_ignore_ascii_case("desc") => Order::Desc,
        Some(_) => return None,
    };
    let n = match r.max_push_num {
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(PULL_MAX).min(PULL_MAX),
        _ => PULL_MAX,
    };
    Some((n, order))
}

impl OfflinePull {
    /// A new connection: deciding for `window` (zero: pull disabled).
    pub(super) fn new(window: Duration) -> OfflinePull {
        let mode = if window.is_zero() {
            Mode::Push
        } else {
            Mode::Deciding { deadline: Instant::now() + window, held: None }
        };
        OfflinePull { mode, recent: VecDeque::new() }
    }

    /// A restored session is about to read back its backlog: hold it while deciding.
    /// `ends`: the router's positions of the partitions to read back.
    pub(super) fn hold(&mut self, ends: Vec<(TopicPartition, u64)>) {
        if let Mode::Deciding { held, .. } = &mut self.mode {
            *held = Some(ends);
        }
    }

    /// Whether the client may still switch to pull mode (the window is open).
    pub(super) fn deciding(&self) -> bool {
        matches!(self.mode, Mode::Deciding { .. })
    }

    /// Whether reading back the backlog must wait.
    pub(super) fn holds_catchup(&self) -> bool {
        matches!(self.mode, Mode::Deciding { held: Some(_), .. })
    }

    /// When the held backlog is pushed if no request came.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match &self.mode {
            Mode::Deciding { deadline, held: Some(_) } => Some(*deadline),
            _ => None,
        }
    }

    /// The window is over (deadline, or the client published something else): push.
    pub(super) fn push(&mut self) {
        if matches!(self.mode, Mode::Deciding { .. }) {
            self.mode = Mode::Push;
        }
    }

    /// Room for one more request now (sliding window of one second).
    fn take_slot(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
            self.recent.pop_front();
        }
        if self.recent.len() >= PULLS_PER_SECOND {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// An offline pull request being served: read window by window beside the loop
/// (`waiting`), each window's messages queued as it arrives. Deliveries and read-back wait
/// meanwhile: they must not read a backlog while it is being held or pulled.
pub(super) struct Pulling {
    qos: QoS,
    packet_id: Option<PacketId>,
    payload: Bytes,
    want: usize,
    order: Order,
    /// The held backlogs' partitions in the request's order, and the one read next.
    tps: Vec<TopicPartition>,
    next: usize,
    taken: usize,
    scanned: usize,
}

/// One read of a held backlog.
pub(super) struct PullRead {
    tp: TopicPartition,
    held: Held,
    window: Result<Window, BackendError>,
}

pub(super) enum Window {
    /// Oldest first: one fetch from the bottom of the held range.
    Oldest(Fetched),
    /// Newest first: the records of the range's top window, from `start`.
    Newest { records: Vec<Arc<crate::backend::Record>>, start: u64 },
}

/// What a request does first, by the connection's mode.
enum First {
    Refuse,
    Hold(Vec<(TopicPartition, u64)>),
    Pull,
}

impl Conn {
    /// A PUBLISH to `$SYS/getOfflineMsg`: answered (PUBACK / PUBREC with the outcome; MQTT
    /// 3.1.1 has no reason codes, so a refused request there just delivers nothing), and the
    /// pulled messages queued for delivery.
    pub(super) fn on_pull_request(&mut self, p: &Publish, appends: &mut Appends) -> Result<(), End> {
        let op = Pulling {
            qos: p.qos,
            packet_id: p.packet_id,
            payload: p.payload.clone(),
            want: 0,
            order: Order::Asc,
            tps: Vec::new(),
            next: 0,
            taken: 0,
            scanned: 0,
        };
        let first = match &mut self.offline.mode {
            Mode::Pull => First::Pull,
            // Too late: the backlog is being pushed already.
            Mode::Push => First::Refuse,
            Mode::Deciding { deadline, .. } if Instant::now() >= *deadline => First::Refuse,
            Mode::Deciding { held, .. } => First::Hold(held.take().unwrap_or_default()),
        };
        let step = match first {
            First::Refuse => {
                self.offline.mode = Mode::Push;
                self.pull_answer(op, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR)
            }
            First::Hold(ends) => {
                self.offline.mode = Mode::Pull;
                Some(self.hold_backlog(op, ends))
            }
            First::Pull => self.pull_start(op),
        };
        match step {
            Some(step) => self.wait_for(step, appends),
            None => Ok(()),
        }
    }

    /// Pull mode begins: each partition waiting to be read back holds its backlog, from the
    /// committed position to the end of the log now (nothing of it was delivered yet), and is
    /// read back (live) from there on. `ends`: the router's positions at CONNECT, used where
    /// the end cannot be read.
    fn hold_backlog(&self, op: Pulling, ends: Vec<(TopicPartition, u64)>) -> Step {
        let lagging = self.slot.lagging();
        let backend = self.ctx.backend.clone();
        let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let step = async move {
            let mut held = Vec::with_capacity(lagging.len());
            for (tp, lag) in lagging {
                let end = match tokio::time::timeout(timeout, backend.end_offset(&tp)).await {
                    Ok(Ok(end)) => Some(end),
                    _ => ends.iter().find(|(t, _)| *t == tp).map(|(_, end)| *end),
                };
                held.push((tp, lag, end));
            }
            Resume::PullHeld(op, held)
        };
        Step::holding_deliveries(step.boxed())
    }

    /// The backlogs' ends are known: hold them (a partition whose end is unknown is pushed as
    /// before), then serve the request.
    pub(super) fn on_pull_held(
        &mut self,
        op: Pulling,
        held: Vec<(TopicPartition, u64, Option<u64>)>,
    ) -> Result<Option<Step>, End> {
        for (tp, lag, end) in held {
            let Some(end) = end else { continue };
            let c = self.session.state.cursor(&tp, lag);
            let lo = c.committed().min(lag);
            c.hold(lo, end.max(lo));
        }
        self.session.changed = true;
        Ok(self.pull_start(op))
    }

    fn pull_start(&mut self, mut op: Pulling) -> Option<Step> {
        let Some((want, order)) = parse_request(&op.payload) else {
            return self.pull_answer(op, ReasonCode::PAYLOAD_FORMAT_INVALID);
        };
        // Bounded: earlier pulls (and deliveries) still waiting to be sent count against it.
        if self.session.queued() + want > PENDING_HIGH_WATER || !self.offline.take_slot(Instant::now()) {
            let code = self.ctx.limits.count(Refusal::OfflinePullLimit).reason_code();
            return self.pull_answer(op, code);
        }
        let mut tps: Vec<TopicPartition> =
            self.session.state.cursors.iter().filter(|(_, c)| c.held.is_some()).map(|(tp, _)| tp.clone()).collect();
        tps.sort();
        if order == Order::Desc {
            tps.reverse();
        }
        (op.want, op.order, op.tps) = (want, order, tps);
        self.pull_next(op)
    }

    /// Read the next window of the held backlogs (partitions in order, ASC from the first,
    /// DESC from the last), or answer once `want` messages are queued, the scan bound is
    /// reached or nothing is held any more.
    fn pull_next(&mut self, mut op: Pulling) -> Option<Step> {
        while op.taken < op.want && op.scanned < PULL_SCAN_MAX {
            let Some(tp) = op.tps.get(op.next).cloned() else { break };
            let Some(held) = self.session.state.cursors.get(&tp).and_then(|c| c.held) else {
                op.next += 1;
                continue;
            };
            let ctx = self.ctx.clone();
            let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
            let step = async move {
                let window = read_window(&ctx, &tp, held, op.order, timeout).await;
                Resume::Pulled(op, PullRead { tp, held, window })
            };
            return Some(Step::holding_deliveries(step.boxed()));
        }
        tracing::debug!(client_id = %self.client_id, pulled = op.taken, order = ?op.order, "offline pull");
        self.pull_answer(op, ReasonCode::SUCCESS)
    }

    /// A window was read: queue its messages, keep what is still held, read on.
    pub(super) fn on_pulled(&mut self, mut op: Pulling, read: PullRead) -> Result<Option<Step>, End> {
        let h = read.held;
        let (lo, hi) = match &read.window {
            Err(e) => {
                tracing::warn!(client_id = %self.client_id, error = %e, "offline pull: cannot read the core service");
                return Ok(self.pull_answer(op, ReasonCode::UNSPECIFIED_ERROR));
            }
            Ok(Window::Oldest(f)) => self.take_oldest(f, h, &mut op),
            Ok(Window::Newest { records, start }) => self.take_newest(records, *start, h, &mut op),
        };
        if let Some(c) = self.session.state.cursors.get_mut(&read.tp) {
            c.set_held(lo, hi);
        }
        Ok(self.pull_next(op))
    }

    /// Queue the messages of a window from the bottom of `h`; returns what is still held.
    fn take_oldest(&mut self, f: &Fetched, h: Held, op: &mut Pulling) -> (u64, u64) {
        let mut lo = h.lo;
        for r in f.records.iter().filter(|r| r.offset >= h.lo) {
            if op.taken >= op.want {
                return (lo, h.hi);
            }
            if r.offset >= h.hi {
                return (h.hi, h.hi);
            }
            op.scanned += 1;
            lo = r.offset + 1;
            if self.offer_pulled(r) {
                op.taken += 1;
            }
        }
        // The whole read is behind us; nothing read: the log ends before the backlog did
        // (records lost before their fsync, never acknowledged to their publishers).
        let next = if f.records.is_empty() && f.next_offset <= h.lo { h.hi } else { f.next_offset };
        (lo.max(next).min(h.hi), h.hi)
    }

    /// Queue the messages of the window at the top of `h` (from `start`), newest first;
    /// returns what is still held.
    fn take_newest(
        &mut self,
        window: &[Arc<crate::backend::Record>],
        start: u64,
        h: Held,
        op: &mut Pulling,
    ) -> (u64, u64) {
        for r in window.iter().rev() {
            if op.taken >= op.want {
                return (h.lo, r.offset + 1);
            }
            op.scanned += 1;
            if self.offer_pulled(r) {
                op.taken += 1;
            }
        }
        // The whole window is behind us.
        (h.lo, start)
    }

    /// Answer the request with `code`.
    fn pull_answer(&mut self, op: Pulling, code: ReasonCode) -> Option<Step> {
        if code.is_error() {
            tracing::debug!(client_id = %self.client_id, code = code.0, "offline pull request refused");
        }
        let mut ack = PubResponse::new(PacketId::MIN);
        if self.protocol == Protocol::V5 {
            ack.code = code;
        }
        match (op.qos, op.packet_id) {
            (QoS::AtLeastOnce, Some(pid)) => self.send(&Packet::PubAck(PubResponse { packet_id: pid, ..ack })),
            (QoS::ExactlyOnce, Some(pid)) => {
                // A refused MQTT 5 request ends with its PUBREC; otherwise PUBREL follows.
                if !ack.code.is_error() {
                    self.session.state.inbound_qos2.insert(pid.get());
                }
                self.send(&Packet::PubRec(PubResponse { packet_id: pid, ..ack }));
            }
            _ => {}
        }
        None
    }

    /// A record of a held backlog: queued for delivery if it is for this session and not
    /// delivered or acknowledged already (`true`), else passed over.
    fn offer_pulled(&mut self, r: &crate::backend::Record) -> bool {
        let Some(c) = self.session.state.cursors.get(&r.tp) else { return false };
        if c.pending.contains(&r.offset) || c.acked.contains(&r.offset) {
            return false;
        }
        let Some(message) = record_message(&self.ctx, &r.tp, &r.record) else { return false };
        self.session.queue_if_matching(&r.tp, r.offset, message, None, now_ms())
    }
}

/// Read one window of the held range `h`: from its bottom (oldest first) or its top.
async fn read_window(
    ctx: &Context,
    tp: &TopicPartition,
    h: Held,
    order: Order,
    timeout: Duration,
) -> Result<Window, BackendError> {
    if order == Order::Asc {
        let f = fetch(ctx, tp, h.lo, PULL_FETCH, timeout).await?;
        if f.records.is_empty() && f.next_offset <= h.lo && h.lo < f.high_watermark {
            return Err(BackendError::unavailable(format!("nothing read at {tp}:{}", h.lo)));
        }
        return Ok(Window::Oldest(f));
    }
    let start = h.hi.saturating_sub(PULL_FETCH as u64).max(h.lo);
    let mut records: Vec<Arc<crate::backend::Record>> = Vec::new();
    let mut from = start;
    while from < h.hi {
        let max = usize::try_from(h.hi - from).unwrap_or(PULL_FETCH).min(PULL_FETCH);
        let f = fetch(ctx, tp, from, max, timeout).await?;
        if f.records.is_empty() && f.next_offset <= from && from < f.high_watermark {
            return Err(BackendError::unavailable(format!("nothing read at {tp}:{from}")));
        }
        records.extend(f.records.iter().filter(|r| r.offset >= from && r.offset < h.hi).cloned());
        if f.records.is_empty() || f.next_offset <= from {
            break;
        }
        from = f.next_offset;
    }
    Ok(Window::Newest { records, start })
}

async fn fetch(
    ctx: &Context,
    tp: &TopicPartition,
    from: u64,
    max: usize,
    timeout: Duration,
) -> Result<Fetched, BackendError> {
    match tokio::time::timeout(timeout, ctx.backend.fetch(tp, from, max)).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_capped_at_30_and_default_to_oldest_first() {
        assert_eq!(parse_request(br#"{"maxPushNum":50,"pushOrder":"DESC"}"#), Some((30, Order::Desc)));
        assert_eq!(parse_request(br#"{"maxPushNum":7,"pushOrder":"ASC"}"#), Some((7, Order::Asc)));
        assert_eq!(parse_request(br#"{"maxPushNum":0}"#), Some((30, Order::Asc)));
        assert_eq!(parse_request(br#"{"maxPushNum":-3,"pushOrder":"desc"}"#), Some((30, Order::Desc)));
        assert_eq!(parse_request(b""), Some((30, Order::Asc)));
        assert_eq!(parse_request(br#"{"pushOrder":"SIDEWAYS"}"#), None);
        assert_eq!(parse_request(b"not json"), None);
        assert_eq!(parse_request(br#"{"maxPushNum":"ten"}"#), None);
    }

    #[test]
    fn at_most_five_requests_in_any_second() {
        let mut p = OfflinePull::new(Duration::from_millis(500));
        let t = Instant::now();
        for i in 0..5 {
            assert!(p.take_slot(t + Duration::from_millis(i * 100)), "request {i}");
        }
        assert!(!p.take_slot(t + Duration::from_millis(900)), "the 6th within a second");
        assert!(p.take_slot(t + Duration::from_millis(1000)), "a second after the first");
        assert!(!p.take_slot(t + Duration::from_millis(1050)));
    }
}
