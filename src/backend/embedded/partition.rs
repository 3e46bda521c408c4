//! One partition of the embedded log: its segments, the writer task doing group commit,
//! the in-memory cache of recent records, reads, tail wake-ups and retention.
//!
//! Writes go through a bounded queue to a single writer task per partition. The writer takes
//! one request, drains what else is queued (up to [`MAX_BATCH`]), assigns consecutive
//! offsets, encodes the batch into one buffer and writes it on the blocking pool (plus
//! `sync_data` with `fsync: always`). Once the write (and with `always` the fsync) succeeded it
//! publishes the records (segment size, high watermark, cache) so readers see them and
//! completes the callers' oneshots (the acknowledgement); a failed write or fsync fails the
//! whole batch, nothing of it becomes visible, and the file is truncated back before the next
//! write. While a batch is on disk the next one accumulates in the queue: that is the group
//! commit.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::segment::{self, ReadSpan, SegmentMeta};
use crate::backend::{BackendError, CoreRecord, Fetched, LiveSink, Position, Record, Result, TopicPartition};
use crate::config::FsyncPolicy;

/// Most append requests written as one batch.
pub(crate) const MAX_BATCH: usize = 1024;
/// Most bytes encoded into one batch (a batch always holds at least one request).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Capacity of a partition's append queue; a full queue makes `append` wait.
const QUEUE_CAPACITY: usize = 4096;

/// One append waiting for the writer.
pub(crate) struct AppendReq {
    pub record: CoreRecord,
    pub done: oneshot::Sender<Result<Position>>,
}

/// Settings a partition needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct PartitionSettings {
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    pub segment_bytes: u64,
    pub cache_records: usize,
    pub cache_bytes: usize,
}

/// Mutable state shared between the writer and readers.
struct PartState {
    /// Segments by ascending base offset; the last one is active (never empty list).
    segments: Vec<SegmentMeta>,
    /// First retained offset.
    log_start: u64,
    /// Next offset to be assigned; everything below it is acknowledged and readable.
    high_watermark: u64,
    /// The most recent records, consecutive, ending at `high_watermark - 1`, at most
    /// `cache_records` of them and `cache_bytes` of their memory size.
    cache: VecDeque<Arc<Record>>,
    /// Memory size of the records in `cache` (`CoreRecord::memory_size`).
    cached_bytes: usize,
}

impl PartState {
    fn cache_pop_front(&mut self) {
        if let Some(r) = self.cache.pop_front() {
            self.cached_bytes = self.cached_bytes.saturating_sub(r.record.memory_size());
        }
    }
}

/// What a read needs, decided under the lock.
enum ReadPlan {
    Done(Fetched),
    Disk { spans: Vec<ReadSpan>, from: u64, high_watermark: u64 },
}

pub(crate) struct Partition {
    pub tp: TopicPartition,
    dir: PathBuf,
    settings: PartitionSettings,
    state: Mutex<PartState>,
    sender: Mutex<Option<mpsc::Sender<AppendReq>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Tails to wake when records become visible.
    waiters: Mutex<Vec<Weak<Notify>>>,
    /// Where the writer pushes records as it makes them visible (the router).
    sinks: Mutex<Vec<Weak<dyn LiveSink>>>,
}

impl Partition {
    /// Recover a partition from `dir` (created if missing): scan its segments, truncate a
    /// torn tail of the last one, rebuild the sparse index. Blocking.
    pub(crate) fn recover(tp: TopicPartition, dir: PathBuf, settings: PartitionSettings) -> io::Result<Partition> {
        std::fs::create_dir_all(&dir)?;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if let Some(base) = entry.file_name().to_str().and_then(segment::parse_segment_file_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let scan = segment::scan_segment(&dir, base)?;
            if let Some(problem) = &scan.problem {
                if i + 1 == count {
                    tracing::warn!(
                        partition = %tp, segment = %scan.meta.path.display(),
                        valid_bytes = scan.meta.size, %problem,
                        "truncating torn or corrupt tail of the log"
                    );
                    let file = OpenOptions::new().write(true).open(&scan.meta.path)?;
                    file.set_len(scan.meta.size)?;
                    file.sync_all()?;
                } else {
                    tracing::error!(
                        partition = %tp, segment = %scan.meta.path.display(),
                        valid_bytes = scan.meta.size, %problem,
                        "corrupt record in a sealed segment; records after it are skipped"
                    );
                }
            }
            if let Some(prev) = segments.last() {
                let prev: &SegmentMeta = prev;
                if scan.meta.base_offset < prev.next_offset {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("segment {} overlaps the previous one", scan.meta.path.display()),
                    ));
                }
            }
            segments.push(scan.meta);
        }
        if segments.is_empty() {
            let meta = SegmentMeta::empty(&dir, 0);
            File::create(&meta.path)?.sync_all()?;
            sync_dir(&dir);
            segments.push(meta);
        }
        let log_start = segments.first().map_or(0, |s| s.base_offset);
        let high_watermark = segments.last().map_or(0, |s| s.next_offset);
        Ok(Partition {
            tp,
            dir,
            settings,
            state: Mutex::new(PartState {
                segments,
                log_start,
                high_watermark,
                cache: VecDeque::new(),
                cached_bytes: 0,
            }),
            sender: Mutex::new(None),
            writer: Mutex::new(None),
            waiters: Mutex::new(Vec::new()),
            sinks: Mutex::new(Vec::new()),
        })
    }

    /// Start the writer task. `healthy` is cleared on a failed write and set on a good one.
    pub(crate) fn start(self: &Arc<Self>, healthy: Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        *self.sender.lock() = Some(tx);
        let writer = Writer { part: Arc::clone(self), file: None, healthy, dirty: false };
        *self.writer.lock() = Some(tokio::spawn(writer.run(rx)));
    }

    /// Queue an append; resolves when the record is written (and synced, per policy).
    pub(crate) fn sender(&self) -> Option<mpsc::Sender<AppendReq>> {
        self.sender.lock().clone()
    }

    /// Refuse new appends; the writer finishes what is queued, syncs and stops.
    pub(crate) fn stop_accepting(&self) {
        self.sender.lock().take();
    }

    /// Stop accepting appends, let the writer finish what is queued, sync and stop.
    pub(crate) async fn close(&self) {
        self.stop_accepting();
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            if let Err(e) = writer.await {
                tracing::error!(partition = %self.tp, error = %e, "log writer task failed");
            }
        }
        self.wake_tails();
    }

    pub(crate) fn high_watermark(&self) -> u64 {
        self.state.lock().high_watermark
    }

    #[cfg(test)]
    pub(crate) fn log_start(&self) -> u64 {
        self.state.lock().log_start
    }

    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.state.lock().segments.len()
    }

    /// Push every record from the returned offset on to `sink` as it becomes visible. The
    /// offset is read and the sink added under the state lock, and the writer reads the
    /// sinks after publishing a batch under that lock: no record at or after the offset is
    /// missed (one published just before may be pushed too).
    pub(crate) fn push_to(&self, sink: Weak<dyn LiveSink>) -> u64 {
        let st = self.state.lock();
        let mut sinks = self.sinks.lock();
        sinks.retain(|s| s.strong_count() > 0);
        if !sinks.iter().any(|s| Weak::ptr_eq(s, &sink)) {
            sinks.push(sink);
        }
        st.high_watermark
    }

    /// Hand records just made visible to the sinks, in the writer's task.
    fn push(&self, records: &[Arc<Record>]) {
        let sinks: Vec<Arc<dyn LiveSink>> = {
            let mut sinks = self.sinks.lock();
            if sinks.is_empty() {
                return;
            }
            sinks.retain(|s| s.strong_count() > 0);
            sinks.iter().filter_map(Weak::upgrade).collect()
        };
        for sink in sinks {
            sink.offer(records);
        }
    }

    /// Register a tail to wake when new records become visible.
    pub(crate) fn add_waiter(&self, notify: &Arc<Notify>) {
        let mut waiters = self.waiters.lock();
        waiters.retain(|w| w.strong_count() > 0);
        if !waiters.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(notify))) {
            waiters.push(Arc::downgrade(notify));
        }
    }

    pub(crate) fn remove_waiter(&self, notify: &Arc<Notify>) {
        self.waiters.lock().retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(notify)));
    }

    pub(crate) fn wake_tails(&self) {
        let mut waiters = self.waiters.lock();
        waiters.retain(|w| match w.upgrade() {
            Some(n) => {
                // `notify_one` stores a permit when nobody waits: no wake-up is lost.
                n.notify_one();
                true
            }
            None => false,
        });
    }

    /// Read up to `max` records from `from` (see [`crate::backend::CoreService::fetch`]).
    pub(crate) async fn fetch(self: &Arc<Self>, from: u64, max: usize) -> Result<Fetched> {
        let mut attempt = 0;
        loop {
            let (spans, start, high_watermark) = match self.plan_read(from, max) {
                ReadPlan::Done(fetched) => return Ok(fetched),
                ReadPlan::Disk { spans, from, high_watermark } => (spans, from, high_watermark),
            };
            let tp = self.tp.clone();
            let read =
                tokio::task::spawn_blocking(move || segment::read_records(&tp, &spans, start, high_watermark, max))
                    .await
                    .map_err(|e| BackendError::storage_from("read task failed", e))?;
            match read {
                Ok(records) => {
                    let next_offset = records.last().map_or(high_watermark, |r| r.offset + 1);
                    return Ok(Fetched { records, next_offset, high_watermark });
                }
                // Retention deleted a segment between planning and reading: plan again.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 => attempt += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Records in the in-memory cache and their memory size.
    #[cfg(test)]
    pub(crate) fn cache_usage(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.cache.len(), st.cached_bytes)
    }

    fn plan_read(&self, from: u64, max: usize) -> ReadPlan {
        let st = self.state.lock();
        let high_watermark = st.high_watermark;
        let start = from.max(st.log_start);
        if max == 0 || start >= high_watermark {
            return ReadPlan::Done(Fetched {
                records: Vec::new(),
                next_offset: from.max(st.log_start.min(high_watermark)),
                high_watermark,
            });
        }
        if let Some(first) = st.cache.front() {
            if start >= first.offset {
                // Cache offsets are consecutive, so the index is the distance.
                let skip = usize::try_from(start - first.offset).unwrap_or(usize::MAX);
                let records: Vec<_> = st.cache.iter().skip(skip).take(max).cloned().collect();
                let next_offset = records.last().map_or(start, |r| r.offset + 1);
                return ReadPlan::Done(Fetched { records, next_offset, high_watermark });
            }
        }
        let first = st.segments.partition_point(|s| s.base_offset <= start).saturating_sub(1);
        let spans = st.segments[first..]
            .iter()
            .enumerate()
            .map(|(i, s)| ReadSpan {
                path: s.path.clone(),
                start: if i == 0 { s.position_for(start) } else { 0 },
                end: s.size,
            })
            .collect();
        ReadPlan::Disk { spans, from: start, high_watermark }
    }

    /// Drop the sealed segments (oldest first, never the active one) whose newest record is
    /// older than `now_ms - retention_ms`; returns how many were deleted.
    pub(crate) fn apply_retention(&self, now_ms: i64, retention_ms: i64) -> usize {
        let cutoff = now_ms.saturating_sub(retention_ms);
        let removed: Vec<SegmentMeta> = {
            let mut st = self.state.lock();
            let sealed = st.segments.len().saturating_sub(1);
            let n = st.segments[..sealed].iter().take_while(|s| s.max_timestamp < cutoff).count();
            if n == 0 {
                return 0;
            }
            let removed = st.segments.drain(..n).collect();
            let start = st.segments.first().map_or(st.high_watermark, |s| s.base_offset);
            st.log_start = start;
            while st.cache.front().is_some_and(|r| r.offset < start) {
                st.cache_pop_front();
            }
            removed
        };
        for seg in &removed {
            // Open readers keep reading the unlinked file; new ones re-plan on NotFound.
            if let Err(e) = std::fs::remove_file(&seg.path) {
                tracing::warn!(segment = %seg.path.display(), error = %e, "cannot delete expired segment");
            }
        }
        tracing::info!(partition = %self.tp, segments = removed.len(), "retention deleted segments");
        removed.len()
    }

    fn settings(&self) -> &PartitionSettings {
        &self.settings
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Best-effort fsync of a directory so that created / renamed files survive power loss.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "directory fsync failed");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The writer task of one partition.
struct Writer {
    part: Arc<Partition>,
    /// Active segment file, positioned nowhere in particular; `None` after a failure
    /// (reopened and truncated to the acknowledged size before the next write).
    file: Option<File>,
    healthy: Arc<AtomicBool>,
    /// Written but not yet synced (`fsync: interval`).
    dirty: bool,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<AppendReq>) {
        let policy = self.part.settings().fsync;
        let mut tick = tokio::time::interval(self.part.settings().fsync_interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Not `biased`: under constant load the interval fsync must still get its turn.
            let first = tokio::select! {
                req = rx.recv() => match req {
                    Some(req) => req,
                    None => break,
                },
                _ = tick.tick(), if policy == FsyncPolicy::Interval && self.dirty => {
                    self.sync().await;
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.write_batch(batch).await;
        }
        if policy != FsyncPolicy::Never {
            self.sync().await;
        }
    }

    /// fsync the active file if anything is unsynced.
    async fn sync(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        let (file, res) = match tokio::task::spawn_blocking(move || {
            let res = file.sync_data();
            (file, res)
        })
        .await
        {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(partition = %self.part.tp, error = %e, "fsync task failed");
                return;
            }
        };
        match res {
            Ok(()) => {
                self.dirty = false;
                self.file = Some(file);
            }
            Err(e) => {
                // Keep `dirty`; the file is reopened and the sync retried on the next tick.
                tracing::error!(partition = %self.part.tp, error = %e, "fsync failed");
                self.healthy.store(false, Ordering::Release);
            }
        }
    }

    async fn write_batch(&mut self, mut batch: Vec<AppendReq>) {
        let mut overflow = Vec::new();
        // Keep the batch under MAX_BATCH_BYTES (at least one request).
        let mut bytes = 0usize;
        let mut keep = batch.len();
        for (i, req) in batch.iter().enumerate() {
            bytes += segment::frame_len(&req.record);
            if i > 0 && bytes > MAX_BATCH_BYTES {
                keep = i;
                break;
            }
        }
        if keep < batch.len() {
            overflow = batch.split_off(keep);
        }
        self.write_some(batch).await;
        if !overflow.is_empty() {
            Box::pin(self.write_batch(overflow)).await;
        }
    }

    async fn write_some(&mut self, batch: Vec<AppendReq>) {
        match self.try_write(batch).await {
            Ok(()) => {}
            Err((batch, e)) => {
                tracing::error!(partition = %self.part.tp, error = %e, "log write failed");
                self.healthy.store(false, Ordering::Release);
                self.file = None;
                for req in batch {
                    let _ = req.done.send(Err(BackendError::storage_io_copy(&e)));
                }
            }
        }
    }

    /// Roll to a new segment if the active one is full, and make sure the file is open.
    async fn prepare(&mut self) -> io::Result<(PathBuf, u64)> {
        let (active_path, active_size, high_watermark) = {
            let st = self.part.state.lock();
            let active = st.segments.last().ok_or_else(|| io::Error::other("partition has no segment"))?;
            (active.path.clone(), active.size, st.high_watermark)
        };
        let settings = self.part.settings().clone();
        if active_size > 0 && active_size >= settings.segment_bytes {
            let new = SegmentMeta::empty(self.part.dir(), high_watermark);
            let old = self.file.take();
            let (path, dir) = (new.path.clone(), self.part.dir().to_path_buf());
            let file = run_blocking(move || {
                if let Some(old) = old {
                    if settings.fsync != FsyncPolicy::Never {
                        old.sync_data()?;
                    }
                }
                let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
                if settings.fsync == FsyncPolicy::Always {
                    sync_dir(&dir);
                }
                Ok(file)
            })
            .await?;
            self.file = Some(file);
            self.dirty = false;
            let mut st = self.part.state.lock();
            let path = new.path.clone();
            st.segments.push(new);
            return Ok((path, 0));
        }
        if self.file.is_none() {
            let path = active_path.clone();
            let file = run_blocking(move || {
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                // Drop whatever a failed write may have left after the acknowledged bytes.
                file.set_len(active_size)?;
                Ok(file)
            })
            .await?;
            self.file = Some(file);
        }
        Ok((active_path, active_size))
    }

    async fn try_write(&mut self, batch: Vec<AppendReq>) -> std::result::Result<(), (Vec<AppendReq>, io::Error)> {
        let (_, size) = match self.prepare().await {
            Ok(v) => v,
            Err(e) => return Err((batch, e)),
        };
        let Some(mut file) = self.file.take() else {
            return Err((batch, io::Error::other("segment file not open")));
        };
        let base = self.part.high_watermark();
        let mut buf = Vec::with_capacity(batch.iter().map(|r| segment::frame_len(&r.record)).sum());
        let mut lens = Vec::with_capacity(batch.len());
        let mut values = Vec::with_capacity(batch.len());
        for (i, req) in batch.iter().enumerate() {
            let before = buf.len();
            segment::encode_record(&mut buf, base + i as u64, &req.record);
            lens.push((buf.len() - before) as u64);
            // The value is the frame's last field.
            values.push(buf.len() - req.record.value.len()..buf.len());
        }
        // Cached records take their values from this batch buffer rather than keeping the
        // appenders' buffers (often whole socket read buffers) alive.
        let buf = Bytes::from(buf);
        let written = buf.clone();
        let sync = self.part.settings().fsync == FsyncPolicy::Always;
        // `fsync: always`: nothing is visible before it is durable, so no reader (a persistent
        // session's position included) ever sees a record that a crash of the machine could
        // take back and whose offset could then be given to another record. A failed fsync
        // fails the whole batch: the file is dropped, and reopened and truncated to the last
        // durable size before the next write (after a failed fsync the kernel may have thrown
        // the dirty pages away; a later fsync would not write them again). The write and the
        // fsync are one trip to the blocking pool: each trip is two thread wake-ups on the
        // path of every message.
        let joined = tokio::task::spawn_blocking(move || {
            let res = (|| {
                file.seek(SeekFrom::Start(size))?;
                file.write_all(&written)
            })()
            .map_err(|e| (false, e))
            .and_then(|()| if sync { file.sync_data().map_err(|e| (true, e)) } else { Ok(()) });
            (file, res)
        })
        .await;
        let file = match joined {
            Ok((file, Ok(()))) => file,
            Ok((_, Err((in_fsync, e)))) => {
                if in_fsync {
                    tracing::error!(partition = %self.part.tp, error = %e, "fsync failed; batch not acknowledged");
                }
                return Err((batch, e));
            }
            Err(e) => return Err((batch, io::Error::other(format!("write task failed: {e}")))),
        };

        // Readers see the records now (with `interval` / `never`: written, not yet synced —
        // they survive a crash of this process, not of the machine).
        let mut dones = Vec::with_capacity(batch.len());
        let mut visible = Vec::with_capacity(batch.len());
        {
            let (cache_cap, cache_bytes) = (self.part.settings().cache_records, self.part.settings().cache_bytes);
            let mut st = self.part.state.lock();
            for (i, ((req, len), value)) in batch.into_iter().zip(lens).zip(values).enumerate() {
                let offset = base + i as u64;
                if let Some(active) = st.segments.last_mut() {
                    active.push(offset, req.record.timestamp_ms, len);
                }
                let size = req.record.memory_size();
                let CoreRecord { key, headers, timestamp_ms, .. } = req.record;
                let record = CoreRecord { key, headers, value: buf.slice(value), timestamp_ms };
                let record = Arc::new(Record { tp: self.part.tp.clone(), offset, record });
                visible.push(record.clone());
                if cache_cap > 0 && size <= cache_bytes {
                    while !st.cache.is_empty() && (st.cache.len() >= cache_cap || st.cached_bytes + size > cache_bytes)
                    {
                        st.cache_pop_front();
                    }
                    st.cache.push_back(record);
                    st.cached_bytes += size;
                } else {
                    // Too large to cache: the cache must stay consecutive up to the high
                    // watermark, so it restarts after this record.
                    while !st.cache.is_empty() {
                        st.cache_pop_front();
                    }
                }
                dones.push((req.done, offset));
            }
            st.high_watermark = base + dones.len() as u64;
        }
        // Pushed before the acknowledgements: a delivery does not wait for the appenders.
        self.part.push(&visible);
        drop(visible);
        self.part.wake_tails();
        self.file = Some(file);
        self.dirty = !sync;
        self.healthy.store(true, Ordering::Release);
        for (done, offset) in dones {
            let _ = done.send(Ok(Position { partition: self.part.tp.partition, offset }));
        }
        Ok(())
    }
}

/// Run blocking file work on the blocking pool.
async fn run_blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

/// Reject records that could not be read back.
pub(crate) fn check_record(record: &CoreRecord) -> Result<()> {
    let len = segment::frame_len(record);
    if len > segment::MAX_FRAME_BYTES || record.key.as_ref().is_some_and(|k| k.len() > i32::MAX as usize) {
        return Err(BackendError::storage(format!(
            "record of {len} bytes exceeds the limit of {} bytes",
            segment::MAX_FRAME_BYTES
        )));
    }
    Ok(())
}
