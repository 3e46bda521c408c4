//! Record framing on disk and segment files of the embedded log.
//!
//! A partition is a sequence of segment files `<base_offset:020>.seg`, each holding
//! consecutive records as frames (all integers little-endian):
//!
//! ```text
//! len u32            bytes that follow (crc + body)
//! crc u32            crc32 of the body
//! body:
//!   offset u64
//!   timestamp_ms i64
//!   key_len i32      -1 = no key
//!   key [key_len]
//!   header_count u32
//!   (name_len u32, name, value_len u32, value) * header_count
//!   value_len u32
//!   value [value_len]
//! ```
//!
//! [`scan_segment`] validates a segment on open (crc, consecutive offsets) and reports where
//! the valid prefix ends so that a torn tail can be truncated; it also rebuilds the sparse
//! index (one entry per ~[`INDEX_INTERVAL_BYTES`]) used by [`read_records`] to seek close
//! to an old offset instead of scanning the whole partition.

use bytes::{Bytes, BytesMut};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{CoreRecord, Record, TopicPartition};

/// File name suffix of segment files.
pub(crate) const SEGMENT_SUFFIX: &str = ".seg";
/// Bytes before the body: `len` and `crc`.
pub(crate) const FRAME_PREFIX: usize = 8;
/// Largest accepted frame (prefix excluded); anything larger is treated as corruption.
pub(crate) const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// One sparse-index entry is kept per this many bytes of segment.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 4096;

/// File name of the segment starting at `base_offset`.
pub(crate) fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}{SEGMENT_SUFFIX}")
}

/// Base offset encoded in a segment file name, if it is one.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Size of the body of `record` (what `len` counts minus the crc).
fn body_len(record: &CoreRecord) -> usize {
    let key = record.key.as_ref().map_or(0, |k| k.len());
    let headers: usize = record.headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
    8 + 8 + 4 + key + 4 + headers + 4 + record.value.len()
}

/// Size of the whole frame of `record` on disk.
pub(crate) fn frame_len(record: &CoreRecord) -> usize {
    FRAME_PREFIX + body_len(record)
}

fn put_len(buf: &mut Vec<u8>, len: usize) {
    // Callers check `frame_len(..) <= MAX_FRAME_BYTES` first, so every length fits in u32.
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

/// Append the frame of `record` at `offset` to `buf`. The caller has checked that the frame
/// is at most [`MAX_FRAME_BYTES`].
pub(crate) fn encode_record(buf: &mut Vec<u8>, offset: u64, record: &CoreRecord) {
    let body = body_len(record);
    buf.reserve(FRAME_PREFIX + body);
    put_len(buf, body + 4);
    let crc_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let body_at = buf.len();
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    match &record.key {
        Some(key) => {
            buf.extend_from_slice(&i32::try_from(key.len()).unwrap_or(i32::MAX).to_le_bytes());
            buf.extend_from_slice(key);
        }
        None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
    }
    put_len(buf, record.headers.len());
    for (name, value) in &record.headers {
        put_len(buf, name.len());
        buf.extend_from_slice(name.as_bytes());
        put_len(buf, value.len());
        buf.extend_from_slice(value);
    }
    put_len(buf, record.value.len());
    buf.extend_from_slice(&record.value);
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The data ends inside the frame.
    Torn,
    /// The frame is complete but invalid.
    Corrupt(&'static str),
}

/// Cursor over a frame body.
struct Cursor {
    body: Bytes,
    at: usize,
}

impl Cursor {
    fn take(&mut self, n: usize) -> Result<Bytes, FrameError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.body.len())
            .ok_or(FrameError::Corrupt("field overruns frame"))?;
        let out = self.body.slice(self.at..end);
        self.at = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }
    fn u32(&mut self) -> Result<usize, FrameError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }
}

/// Decode a frame body (after `len` and `crc`) into its offset and record. Zero-copy: the
/// record's byte fields are slices of `body`.
pub(crate) fn decode_body(body: Bytes) -> Result<(u64, CoreRecord), FrameError> {
    let mut c = Cursor { body, at: 0 };
    let offset = u64::from_le_bytes(c.array()?);
    let timestamp_ms = i64::from_le_bytes(c.array()?);
    let key_len = i32::from_le_bytes(c.array()?);
    let key = match key_len {
        -1 => None,
        n if n >= 0 => Some(c.take(n as usize)?),
        _ => return Err(FrameError::Corrupt("negative key length")),
    };
    let count = c.u32()?;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let n = c.u32()?;
        let name = c.take(n)?;
        let name = std::str::from_utf8(&name).map_err(|_| FrameError::Corrupt("header name is not UTF-8"))?.to_owned();
        let n = c.u32()?;
        headers.push((name, c.take(n)?));
    }
    let n = c.u32()?;
    let value = c.take(n)?;
    if c.at != c.body.len() {
        return Err(FrameError::Corrupt("trailing bytes in frame"));
    }
    Ok((offset, CoreRecord { key, headers, value, timestamp_ms }))
}

/// Decode one whole frame from the start of `buf`; returns the offset, record and the
/// number of bytes consumed.
pub(crate) fn decode_frame(buf: &[u8]) -> Result<(u64, CoreRecord, usize), FrameError> {
    let mut reader = buf;
    match read_frame(&mut reader) {
        Ok(Some((body, total))) => {
            let (offset, record) = decode_body(body)?;
            Ok((offset, record, total))
        }
        Ok(None) => Err(FrameError::Torn),
        Err(ReadFrameError::Frame(e)) => Err(e),
        Err(ReadFrameError::Io(_)) => Err(FrameError::Torn),
    }
}

/// Error while reading a frame from a stream.
#[derive(Debug)]
pub(crate) enum ReadFrameError {
    Io(io::Error),
    Frame(FrameError),
}

/// Read as many bytes as available into `buf` (stops early only at end of data).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Read the next frame of a stream and check its crc. `Ok(None)` = clean end of data.
/// Returns the body and the frame's total size.
pub(crate) fn read_frame<R: Read>(r: &mut R) -> Result<Option<(Bytes, usize)>, ReadFrameError> {
    let mut prefix = [0u8; FRAME_PREFIX];
    let n = read_full(r, &mut prefix).map_err(ReadFrameError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if n < FRAME_PREFIX {
        return Err(ReadFrameError::Frame(FrameError::Torn));
    }
    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if !(4..=MAX_FRAME_BYTES).contains(&len) {
        return Err(ReadFrameError::Frame(FrameError::Corrupt("implausible frame length")));
    }
    let crc = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
    let mut body = BytesMut::zeroed(len - 4);
    let n = read_full(r, &mut body).map_err(ReadFrameError::Io)?;
    if n < body.len() {
        return Err(ReadFrameError::Frame(FrameError::Torn));
    }
    if crc32fast::hash(&body) != crc {
        return Err(ReadFrameError::Frame(FrameError::Corrupt("crc mismatch")));
    }
    Ok(Some((body.freeze(), FRAME_PREFIX + len - 4)))
}

/// What is known about one segment file.
#[derive(Debug, Clone)]
pub(crate) struct SegmentMeta {
    pub base_offset: u64,
    pub path: PathBuf,
    /// Bytes of valid, acknowledged frames.
    pub size: u64,
    /// Offset after the last record in the segment (= `base_offset` when empty).
    pub next_offset: u64,
    /// Newest record timestamp; `i64::MIN` when empty.
    pub max_timestamp: i64,
    /// Sparse index: (offset, file position of its frame), ascending.
    pub index: Vec<(u64, u64)>,
}

impl SegmentMeta {
    pub(crate) fn empty(dir: &Path, base_offset: u64) -> Self {
        SegmentMeta {
            base_offset,
            path: dir.join(segment_file_name(base_offset)),
            size: 0,
            next_offset: base_offset,
            max_timestamp: i64::MIN,
            index: Vec::new(),
        }
    }

    /// Account for a frame of `len` bytes holding `offset` written at the current end.
    pub(crate) fn push(&mut self, offset: u64, timestamp_ms: i64, len: u64) {
        let due = match self.index.last() {
            None => true,
            Some(&(_, pos)) => self.size - pos >= INDEX_INTERVAL_BYTES,
        };
        if due {
            self.index.push((offset, self.size));
        }
        self.size += len;
        self.next_offset = offset + 1;
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
    }

    /// File position to start reading from to find `offset` (a frame at or before it).
    pub(crate) fn position_for(&self, offset: u64) -> u64 {
        let i = self.index.partition_point(|&(o, _)| o <= offset);
        if i == 0 {
            0
        } else {
            self.index[i - 1].1
        }
    }
}

/// Result of scanning a segment on open.
#[derive(Debug)]
pub(crate) struct Scan {
    pub meta: SegmentMeta,
    /// Set when the file holds more bytes than the valid prefix `meta.size`.
    pub problem: Option<String>,
}

/// Validate a segment file and rebuild its metadata. Frames after the first invalid one
/// (torn, bad crc, offset out of sequence) are not counted; `problem` says why.
pub(crate) fn scan_segment(dir: &Path, base_offset: u64) -> io::Result<Scan> {
    let mut meta = SegmentMeta::empty(dir, base_offset);
    let file = File::open(&meta.path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let problem = loop {
        match read_frame(&mut reader) {
            Ok(None) => break None,
            Ok(Some((body, total))) => match decode_body(body) {
                Ok((offset, record)) if offset == meta.next_offset => {
                    meta.push(offset, record.timestamp_ms, total as u64);
                }
                Ok((offset, _)) => break Some(format!("offset {offset} where {} was expected", meta.next_offset)),
                Err(e) => break Some(format!("{e:?}")),
            },
            Err(ReadFrameError::Frame(e)) => break Some(format!("{e:?}")),
            Err(ReadFrameError::Io(e)) => return Err(e),
        }
    };
    let problem = match problem {
        Some(p) => Some(p),
        None if meta.size != file_len => Some("unexpected trailing bytes".to_owned()),
        None => None,
    };
    Ok(Scan { meta, problem })
}

/// Part of a segment to read: from `start` up to `end` (exclusive, acknowledged bytes).
#[derive(Debug, Clone)]
pub(crate) struct ReadSpan {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

/// Read up to `max` records with `from <= offset < until` from `spans`, in order.
pub(crate) fn read_records(
    tp: &TopicPartition,
    spans: &[ReadSpan],
    from: u64,
    until: u64,
    max: usize,
) -> io::Result<Vec<Arc<Record>>> {
    let mut out = Vec::new();
    for span in spans {
        if out.len() >= max || span.end <= span.start {
            break;
        }
        let mut file = File::open(&span.path)?;
        file.seek(SeekFrom::Start(span.start))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(span.end - span.start));
        loop {
            let (body, _) = match read_frame(&mut reader) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(ReadFrameError::Io(e)) => return Err(e),
                Err(ReadFrameError::Frame(e)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e:?}", span.path.display())))
                }
            };
            let (offset, record) = decode_body(body)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e:?}", span.path.display())))?;
            if offset >= until {
                return Ok(out);
            }
            if offset >= from {
                out.push(Arc::new(Record { tp: tp.clone(), offset, record }));
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CoreRecord {
        CoreRecord {
            key: Some(Bytes::from_static(b"client-1")),
            headers: vec![("topic".into(), Bytes::from_static(b"a/b")), ("qoslevel".into(), Bytes::from_static(b"1"))],
            value: Bytes::from_static(b"hello world"),
            timestamp_ms: 1_700_000_000_123,
        }
    }

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        let rec = sample();
        encode_record(&mut buf, 42, &rec);
        let no_key = CoreRecord { key: None, headers: vec![], value: Bytes::new(), timestamp_ms: -5 };
        encode_record(&mut buf, 43, &no_key);
        assert_eq!(frame_len(&rec) + frame_len(&no_key), buf.len());
        let (off, got, used) = decode_frame(&buf).unwrap();
        assert_eq!((off, &got), (42, &rec));
        let (off, got, used2) = decode_frame(&buf[used..]).unwrap();
        assert_eq!((off, &got), (43, &no_key));
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn frame_errors_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, &sample());
        assert_eq!(decode_frame(&buf[..buf.len() - 1]).unwrap_err(), FrameError::Torn);
        assert_eq!(decode_frame(&buf[..3]).unwrap_err(), FrameError::Torn);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(decode_frame(&buf).unwrap_err(), FrameError::Corrupt("crc mismatch"));
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(7), "00000000000000000007.seg");
        assert_eq!(parse_segment_file_name("00000000000000000007.seg"), Some(7));
        assert_eq!(parse_segment_file_name("7.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000000007.tmp"), None);
    }

    #[test]
    fn sparse_index_positions() {
        let dir = Path::new("/nonexistent");
        let mut meta = SegmentMeta::empty(dir, 10);
        for i in 0..100 {
            meta.push(10 + i, 0, 1000);
        }
        assert!(meta.index.len() > 10 && meta.index.len() < 40);
        assert_eq!(meta.position_for(10), 0);
        let pos = meta.position_for(60);
        assert!(pos <= 50 * 1000 && pos + INDEX_INTERVAL_BYTES + 1000 > 50 * 1000);
    }
}
