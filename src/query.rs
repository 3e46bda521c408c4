//! Finding stored messages in the core service (SPEC §10): by message ID, or by topic (a name
//! or a filter), time range and key. Everything is read from the log, with the core service's
//! time index ([`backend::offset_for_time`]) narrowing the range, so any gateway answers the
//! same; nothing is kept here between requests (a page's position travels in its [`Cursor`]).
//!
//! Record times are set by the gateway that stored the record, so within a partition they are
//! ordered only up to the gateways' clock skew: ranges are widened by [`SKEW_MS`] on both sides
//! before the index is asked, and records are then filtered by their own time.
//!
//! Work per request is bounded: at most `max_scan` records are read, spread over the
//! partitions searched; a search that stops early returns a cursor to go on from.

use base64::Engine as _;
use bytes::Bytes;
use std::sync::Arc;

use crate::backend::{self, BackendError, CoreService, Record, TopicPartition};
use crate::router::mapping::{CoreTopic, Message, TopicMap};
use crate::router::topic;
use crate::trace::Event as TraceEvent;

/// Clock skew between gateways tolerated by time-range searches, in milliseconds.
pub const SKEW_MS: i64 = 10_000;

/// Trace events one answer holds at most.
const MAX_TRACE_EVENTS: usize = 10_000;

/// Records read per fetch while scanning.
const WINDOW: usize = 500;

/// A stored message found by a search.
#[derive(Debug, Clone)]
pub struct Found {
    pub msg_id: Option<String>,
    pub message: Message,
    /// The record's key (by default the publisher's ClientId, `topics.record_key`).
    pub key: Option<Bytes>,
    pub tp: TopicPartition,
    pub offset: u64,
}

/// What `GET /api/v1/messages` asks for.
#[derive(Debug, Clone)]
pub struct Search {
    /// A topic name or filter (`+`, `#`); never `$share/...`.
    pub filter: String,
    /// Inclusive time range of the messages, epoch milliseconds.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Only messages whose record key, or MQTT 5 user property `key` / `KEYS`, is this.
    pub key: Option<String>,
    /// Most messages in one page.
    pub limit: usize,
}

/// Where the next page of a search starts: per partition, the next offset to read.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    #[serde(rename = "p")]
    positions: Vec<(String, u32, u64)>,
}

impl Cursor {
    /// URL-safe text of the cursor (Base64 of JSON).
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// `None` when `text` is not a cursor this module wrote (bounded: at most 4 KiB of text).
    pub fn decode(text: &str) -> Option<Cursor> {
        if text.len() > 4096 {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn position(&self, tp: &TopicPartition) -> Option<u64> {
        self.positions.iter().find(|(t, p, _)| **t == *tp.topic && *p == tp.partition).map(|(_, _, o)| *o)
    }
}

/// Why a search cannot run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("`{0}` is not a topic name or filter")]
    BadFilter(String),
    #[error("the cursor was not returned by this search")]
    BadCursor,
    #[error(transparent)]
    Core(#[from] BackendError),
}

/// One page of a search.
#[derive(Debug, Default)]
pub struct Page {
    pub found: Vec<Found>,
    /// Set when more may follow.
    pub next: Option<Cursor>,
}

/// Milliseconds since the epoch encoded in a message ID (its first 12 hex digits).
pub fn id_time(msg_id: &str) -> Option<i64> {
    if msg_id.len() != 32 || !msg_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    i64::from_str_radix(&msg_id[..12], 16).ok()
}

/// The partitions of `topics` (the core service must know each topic).
fn partitions_of(core: &dyn CoreService, topics: &[CoreTopic]) -> Vec<TopicPartition> {
    let mut tps = Vec::new();
    for t in topics {
        let n = core.partitions(&t.name).unwrap_or(t.partitions);
        tps.extend((0..n).map(|p| TopicPartition::new(t.name.clone(), p)));
    }
    tps.sort();
    tps
}

/// Scan `tp` from `from` up to `end`, reading at most `budget` records, keeping what `keep`
/// accepts until `want` are kept. Returns what was kept and the offset after the last record
/// read.
pub(crate) async fn scan<T: Send>(
    core: &dyn CoreService,
    tp: &TopicPartition,
    (from, end): (u64, u64),
    (want, budget): (usize, usize),
    keep: &mut (dyn FnMut(&Arc<Record>) -> Option<T> + Send),
) -> Result<(Vec<T>, u64), BackendError> {
    let mut kept = Vec::new();
    let mut next = from;
    let mut read = 0usize;
    while next < end && kept.len() < want && read < budget {
        let n = WINDOW.min(budget - read).min(usize::try_from(end - next).unwrap_or(WINDOW));
        let batch = core.fetch(tp, next, n).await?;
        if batch.records.is_empty() {
            // Nothing retained there any more: go on from where the service says.
            if batch.next_offset > next {
                next = batch.next_offset.min(end);
                continue;
            }
            break;
        }
        for r in &batch.records {
            if r.offset >= end || kept.len() >= want {
                return Ok((kept, next));
            }
            read += 1;
            next = r.offset + 1;
            if let Some(f) = keep(r) {
                kept.push(f);
            }
        }
        next = next.max(batch.next_offset.min(end));
    }
    Ok((kept, next))
}

fn found(topics: &TopicMap, r: &Record) -> Option<Found> {
    let message = topics.message_of(&r.tp.topic, &r.record)?;
    let msg_id = r.record.header(crate::msgid::HEADER).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned);
    Some(Found { msg_id, message, key: r.record.key.clone(), tp: r.tp.clone(), offset: r.offset })
}

fn key_matches(f: &Found, key: &str) -> bool {
    f.key.as_deref() == Some(key.as_bytes())
        || f.message.user_properties.iter().any(|(k, v)| (k == "key" || k == "KEYS") && v == key)
}

/// The message with ID `msg_id` among `topics`, reading at most `max_scan` records: the ID's
/// time, widened by [`SKEW_MS`], is looked up in each partition's time index.
pub async fn by_id(
    core: &dyn CoreService,
    topics: &TopicMap,
    searched: &[CoreTopic],
    msg_id: &str,
    max_scan: usize,
) -> Result<Option<Found>, BackendError> {
    let Some(t) = id_time(msg_id) else { return Ok(None) };
    let tps = partitions_of(core, searched);
    let budget = (max_scan / tps.len().max(1)).max(WINDOW);
    for tp in &tps {
        let from = backend::offset_for_time(core, tp, t.saturating_sub(SKEW_MS)).await?;
        let end = backend::offset_for_time(core, tp, t.saturating_add(SKEW_MS + 1)).await?;
        let mut keep = |r: &Arc<Record>| {
            let id = r.record.header(crate::msgid::HEADER)?;
            (id.as_ref() == msg_id.as_bytes()).then(|| found(topics, r)).flatten()
        };
        let (hit, _) = scan(core, tp, (from, end), (1, budget), &mut keep).await?;
        if let Some(f) = hit.into_iter().next() {
            return Ok(Some(f));
        }
    }
    Ok(None)
}

/// One page of the messages matching `search` in `searched` (the core topics its filter can
/// reach), oldest first (by record time, then partition and offset), starting at `cursor`.
pub async fn page(
    core: &dyn CoreService,
    topics: &TopicMap,
    searched: &[CoreTopic],
    search: &Search,
    cursor: Option<&Cursor>,
    max_scan: usize,
) -> Result<Page, QueryError> {
    if search.filter.starts_with("$share/") || topic::validate_filter(&search.filter).is_err() {
        return Err(QueryError::BadFilter(search.filter.clone()));
    }
    let tps = partitions_of(core, searched);
    if let Some(c) = cursor {
        if c.positions.iter().any(|(t, p, _)| !tps.iter().any(|tp| *tp.topic == **t && tp.partition == *p)) {
            return Err(QueryError::BadCursor);
        }
    }
    let limit = search.limit.max(1);
    let budget = (max_scan / tps.len().max(1)).max(WINDOW);
    let mut candidates: Vec<(usize, Found)> = Vec::new();
    let mut scanned = Vec::with_capacity(tps.len());
    let mut ends = Vec::with_capacity(tps.len());
    for (i, tp) in tps.iter().enumerate() {
        let end = backend::offset_for_time(core, tp, search.to_ms.saturating_add(SKEW_MS + 1)).await?;
        let from = match cursor {
            Some(c) => c.position(tp).unwrap_or(end),
            None => backend::offset_for_time(core, tp, search.from_ms.saturating_sub(SKEW_MS)).await?,
        };
        let mut keep = |r: &Arc<Record>| {
            let t = r.record.timestamp_ms;
            if t < search.from_ms || t > search.to_ms {
                return None;
            }
            let f = found(topics, r)?;
            if !topic::matches(&search.filter, &f.message.topic) {
                return None;
            }
            match &search.key {
                Some(k) if !key_matches(&f, k) => None,
                _ => Some(f),
            }
        };
        let (kept, next) = scan(core, tp, (from, end), (limit, budget), &mut keep).await?;
        candidates.extend(kept.into_iter().map(|f| (i, f)));
        scanned.push(next);
        ends.push(end);
    }
    candidates.sort_by(|(_, a), (_, b)| {
        (a.message.timestamp_ms, &a.tp, a.offset).cmp(&(b.message.timestamp_ms, &b.tp, b.offset))
    });
    let rest = if candidates.len() > limit { candidates.split_off(limit) } else { Vec::new() };
    // A partition continues at its first match not returned, or after what it scanned.
    let mut positions = scanned;
    for (i, f) in &rest {
        positions[*i] = positions[*i].min(f.offset);
    }
    // Partitions scanned to their end are left out: a cursor's missing partition is done.
    let open: Vec<(String, u32, u64)> = tps
        .iter()
        .zip(positions.iter().zip(&ends))
        .filter(|(_, (pos, end))| pos < end)
        .map(|(tp, (pos, _))| (tp.topic.to_string(), tp.partition, *pos))
        .collect();
    let next = (!open.is_empty()).then_some(Cursor { positions: open });
    Ok(Page { found: candidates.into_iter().map(|(_, f)| f).collect(), next })
}

/// The events of message `msg_id`: publish, stored, then the rest oldest first; every partition of the trace topic is read
/// from the message's time (less the clock-skew margin) to its end, at most `max_scan`
/// records in all. `complete` is false when the scan stopped early.
pub async fn trace_of(
    core: &dyn CoreService,
    (topic, partitions, retention_ms): (&str, u32, u64),
    msg_id: &str,
    max_scan: usize,
) -> Result<(Vec<TraceEvent>, bool), BackendError> {
    let Some(t) = id_time(msg_id) else { return Ok((Vec::new(), true)) };
    core.ensure_topic_with_retention(topic, partitions, retention_ms).await?;
    let n = core.partitions(topic)?;
    let budget = (max_scan / n.max(1) as usize).max(1);
    let mut events = Vec::new();
    let mut complete = true;
    for p in 0..n {
        let tp = TopicPartition::new(topic, p);
        let from = backend::offset_for_time(core, &tp, t.saturating_sub(SKEW_MS)).await?;
        let end = core.end_offset(&tp).await?;
        let mut keep = |r: &Arc<Record>| {
            let mine: Vec<TraceEvent> =
                crate::trace::events_in(&r.record).into_iter().filter(|e| e.msg_id == msg_id).collect();
            (!mine.is_empty()).then_some(mine)
        };
        let (found, next) = scan(core, &tp, (from, end), (usize::MAX, budget), &mut keep).await?;
        complete &= next >= end;
        events.extend(found.into_iter().flatten().take(MAX_TRACE_EVENTS - events.len().min(MAX_TRACE_EVENTS)));
    }
    // Stored before delivered whatever the clocks say: the tail may deliver a record before
    // the acknowledgement that produces `stored` reached the publishing gateway.
    events.sort_by_key(|e| {
        let phase = match e.kind {
            crate::trace::Kind::Publish => 0,
            crate::trace::Kind::Stored => 1,
            _ => 2,
        };
        (phase, e.time_ms, e.kind as u8)
    });
    Ok((events, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_give_their_time_and_junk_gives_none() {
        crate::msgid::init("gw");
        let id = crate::msgid::next(1_700_000_000_123);
        assert_eq!(id_time(&id), Some(1_700_000_000_123));
        assert_eq!(id_time("xyz"), None);
        assert_eq!(id_time(&"G".repeat(32)), None);
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = Cursor { positions: vec![("t".into(), 2, 17)] };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!"), None);
        assert_eq!(Cursor::decode(&"A".repeat(5000)), None);
    }
}
