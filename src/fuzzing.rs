//! Entry points for the fuzz targets in `fuzz/`; not part of the gateway's API.
//!
//! The PROXY header parser and the decoders of stored data are private to their modules.
//! These thin wrappers let the fuzz crate reach them without widening the modules' own
//! interfaces; nothing in the gateway calls this module, and it must stay free of logic of
//! its own (a wrapper that decoded differently would fuzz the wrong code).

use bytes::Bytes;
use std::net::SocketAddr;

use crate::backend::embedded::{partition, segment, state};
use crate::backend::{CoreRecord, Record};

/// [`crate::transport::proxy`]'s parser: `Ok(None)` = incomplete, `Ok(Some((source,
/// header_len)))` = complete, `Err` = refused (the error's text).
pub fn proxy_parse(buf: &[u8]) -> Result<Option<(Option<SocketAddr>, usize)>, String> {
    crate::transport::proxy::parse(buf).map_err(|e| e.to_string())
}

/// Embedded log: one whole frame from the start of `buf` (offset, record, bytes consumed).
pub fn segment_decode_frame(buf: &[u8]) -> Result<(u64, CoreRecord, usize), String> {
    segment::decode_frame(buf).map_err(|e| format!("{e:?}"))
}

/// Embedded log: a frame body (after length and crc).
pub fn segment_decode_body(body: Bytes) -> Result<(u64, CoreRecord), String> {
    segment::decode_body(body).map_err(|e| format!("{e:?}"))
}

/// Embedded log: the frame of `record` at `offset`, or `None` when it is larger than a
/// frame may be (the log refuses such appends before encoding).
pub fn segment_encode_record(offset: u64, record: &CoreRecord) -> Option<Vec<u8>> {
    partition::check_record(record).ok()?;
    let mut buf = Vec::new();
    segment::encode_record(&mut buf, offset, record);
    Some(buf)
}

/// Embedded state stores: the next frame of a store file (body, bytes consumed);
/// `Ok(None)` at a clean end of data.
pub fn state_read_frame(r: &mut &[u8]) -> Result<Option<(Bytes, usize)>, String> {
    segment::read_frame(r).map_err(|e| match e {
        segment::ReadFrameError::Io(e) => e.to_string(),
        segment::ReadFrameError::Frame(e) => format!("{e:?}"),
    })
}

/// Embedded state stores: a frame body as key and value (`None` = tombstone).
pub fn state_decode(body: Bytes) -> Option<(String, Option<Bytes>)> {
    state::decode(body)
}

/// Embedded state stores: the frame of `key` = `value`, or `None` when the store would
/// refuse the put.
pub fn state_encode(key: &str, value: Option<&Bytes>) -> Option<Vec<u8>> {
    state::check_put(key, value).ok()?;
    let mut buf = Vec::new();
    state::encode(&mut buf, key, value);
    Some(buf)
}

/// Revoked-token store: until when a stored value keeps its token revoked.
pub fn revoked_until(value: &[u8]) -> i64 {
    crate::auth::RevokedEntry::revoked_until(value)
}

/// Revoked-token store: the value stored for a token expiring at `exp_ms`.
pub fn revoked_encode(exp_ms: i64) -> Bytes {
    crate::auth::RevokedEntry::encode(exp_ms)
}

/// Events topic: the `connect` event another gateway wrote, as (ClientId, gateway id, time).
pub fn foreign_connect(record: &Record, events_topic: &str, gateway_id: &str) -> Option<(String, String, i64)> {
    crate::session::takeover::foreign_connect(record, events_topic, gateway_id)
        .map(|ev| (ev.client_id, ev.gateway_id, ev.time))
}
