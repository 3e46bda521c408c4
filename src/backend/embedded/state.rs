//! Compacted key-value state of the embedded core service (`StateStore::Sessions`,
//! `Retained`, `Credentials`, `RevokedTokens`), one file `data_dir/state/<store>.kv` each.
//!
//! The file is a sequence of frames (little-endian):
//!
//! ```text
//! len u32     bytes that follow
//! crc u32     crc32 of the body
//! body: key_len u32, key (UTF-8), kind u8 (1 = value, 0 = tombstone), [value_len u32, value]
//! ```
//!
//! On open the frames are replayed into a `HashMap` (a torn or corrupt tail is truncated).
//! Writes go through one writer task per store (group commit as in the log: a batch is
//! written, synced per the fsync policy, applied to the map, broadcast to every
//! `watch_state` subscriber, then acknowledged). When the bytes of overwritten values and
//! tombstones exceed the live bytes (and 1 MiB), the file is rewritten with only the live
//! entries to a temporary file, fsynced and renamed over the old one.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::partition::sync_dir;
use super::segment::{read_frame, ReadFrameError, FRAME_PREFIX, MAX_FRAME_BYTES};
use crate::backend::{BackendError, Result, StateStore, StateUpdate};
use crate::config::FsyncPolicy;

/// Compaction runs only when dead bytes exceed this (and the live bytes).
const COMPACT_MIN_DEAD_BYTES: u64 = 1024 * 1024;
/// Most puts written as one batch.
const MAX_BATCH: usize = 512;
const QUEUE_CAPACITY: usize = 1024;

/// File name of a store.
pub(crate) fn file_name(store: StateStore) -> &'static str {
    match store {
        StateStore::Sessions => "sessions.kv",
        StateStore::Retained => "retained.kv",
        StateStore::Credentials => "credentials.kv",
        StateStore::RevokedTokens => "revoked_tokens.kv",
        StateStore::Delay => "delay.kv",
    }
}

/// Size of the frame holding `key` = `value`.
fn frame_size(key: &str, value: Option<&Bytes>) -> u64 {
    (FRAME_PREFIX + 4 + key.len() + 1 + value.map_or(0, |v| 4 + v.len())) as u64
}

pub(crate) fn encode(buf: &mut Vec<u8>, key: &str, value: Option<&Bytes>) {
    let body = 4 + key.len() + 1 + value.map_or(0, |v| 4 + v.len());
    // `check_put` keeps every length below MAX_FRAME_BYTES, so the casts cannot truncate.
    buf.extend_from_slice(&((body + 4) as u32).to_le_bytes());
    let crc_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let body_at = buf.len();
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    match value {
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        None => buf.push(0),
    }
    let crc = crc32fast::hash(&buf[body_at..]);
    buf[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

pub(crate) fn decode(body: Bytes) -> Option<(String, Option<Bytes>)> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = body.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let key_len = u32_at(0)?;
    let key_end = 4usize.checked_add(key_len)?;
    let key = std::str::from_utf8(body.get(4..key_end)?).ok()?.to_owned();
    match *body.get(key_end)? {
        0 if body.len() == key_end + 1 => Some((key, None)),
        1 => {
            let len = u32_at(key_end + 1)?;
            let start = key_end + 5;
            if start.checked_add(len)? != body.len() {
                return None;
            }
            Some((key, Some(body.slice(start..))))
        }
        _ => None,
    }
}

/// Reject puts whose frame could not be read back.
pub(crate) fn check_put(key: &str, value: Option<&Bytes>) -> Result<()> {
    let size = frame_size(key, value);
    if size > MAX_FRAME_BYTES as u64 {
        return Err(BackendError::storage(format!(
            "state entry of {size} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes"
        )));
    }
    Ok(())
}

struct PutReq {
    key: String,
    value: Option<Bytes>,
    done: oneshot::Sender<Result<()>>,
}

/// Map and subscribers, locked together so a snapshot and later updates never overlap.
struct Shared {
    map: HashMap<String, Bytes>,
    subscribers: Vec<mpsc::Sender<StateUpdate>>,
}

/// One compacted key-value store.
pub(crate) struct KvStore {
    store: StateStore,
    path: PathBuf,
    fsync: FsyncPolicy,
    fsync_interval: Duration,
    shared: Mutex<Shared>,
    sender: Mutex<Option<mpsc::Sender<PutReq>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set on close: a broadcast stuck on a subscriber that never reads gives up.
    closing: watch::Sender<bool>,
    /// Valid file size after loading (consumed by the writer).
    loaded_size: u64,
}

impl KvStore {
    /// Load (or create) the store file in `dir`. Blocking.
    pub(crate) fn load(
        store: StateStore,
        dir: &Path,
        fsync: FsyncPolicy,
        fsync_interval: Duration,
    ) -> io::Result<KvStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(file_name(store));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let file_len = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, &file);
        let mut map = HashMap::new();
        let mut size = 0u64;
        let problem = loop {
            match read_frame(&mut reader) {
                Ok(None) => break None,
                Ok(Some((body, total))) => match decode(body) {
                    Some((key, Some(value))) => {
                        map.insert(key, value);
                        size += total as u64;
                    }
                    Some((key, None)) => {
                        map.remove(&key);
                        size += total as u64;
                    }
                    None => break Some("malformed entry".to_owned()),
                },
                Err(ReadFrameError::Frame(e)) => break Some(format!("{e:?}")),
                Err(ReadFrameError::Io(e)) => return Err(e),
            }
        };
        drop(reader);
        if size != file_len {
            tracing::warn!(
                file = %path.display(), valid_bytes = size,
                problem = problem.as_deref().unwrap_or("trailing bytes"),
                "truncating torn or corrupt tail of a state store"
            );
            file.set_len(size)?;
            file.sync_all()?;
        }
        Ok(KvStore {
            store,
            path,
            fsync,
            fsync_interval,
            shared: Mutex::new(Shared { map, subscribers: Vec::new() }),
            sender: Mutex::new(None),
            writer: Mutex::new(None),
            closing: watch::channel(false).0,
            loaded_size: size,
        })
    }

    pub(crate) fn start(self: &Arc<Self>, healthy: Arc<AtomicBool>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        *self.sender.lock() = Some(tx);
        let live = {
            let shared = self.shared.lock();
            shared.map.iter().map(|(k, v)| frame_size(k, Some(v))).sum()
        };
        let writer = KvWriter { kv: Arc::clone(self), file: None, size: self.loaded_size, live, dirty: false, healthy };
        *self.writer.lock() = Some(tokio::spawn(writer.run(rx)));
    }

    /// Write or delete `key`; resolves after the write, sync (per policy) and broadcast.
    pub(crate) async fn put(&self, key: String, value: Option<Bytes>) -> Result<()> {
        check_put(&key, value.as_ref())?;
        let sender = self.sender.lock().clone().ok_or(BackendError::Closed)?;
        let (done, rx) = oneshot::channel();
        sender.send(PutReq { key, value, done }).await.map_err(|_| BackendError::Closed)?;
        rx.await.map_err(|_| BackendError::Closed)?
    }

    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        self.shared.lock().map.get(key).cloned()
    }

    /// A page of entries in key order (`CoreService::scan_state`).
    pub(crate) fn scan(&self, after: Option<&str>, limit: usize) -> Vec<(String, Bytes)> {
        crate::backend::scan_entries(self.shared.lock().map.iter(), after, limit)
    }

    /// Snapshot of all entries; `updates` receives every later change.
    pub(crate) fn watch(&self, updates: mpsc::Sender<StateUpdate>) -> Vec<(String, Bytes)> {
        let mut shared = self.shared.lock();
        shared.subscribers.retain(|s| !s.is_closed());
        shared.subscribers.push(updates);
        shared.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Refuse new puts; the writer finishes the queued ones, syncs and stops.
    pub(crate) fn stop_accepting(&self) {
        self.closing.send_replace(true);
        self.sender.lock().take();
    }

    /// Stop accepting puts, finish the queued ones, sync and stop.
    pub(crate) async fn close(&self) {
        self.stop_accepting();
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            if let Err(e) = writer.await {
                tracing::error!(store = ?self.store, error = %e, "state writer task failed");
            }
        }
        // Subscribers see their channel close.
        self.shared.lock().subscribers.clear();
    }

    #[cfg(test)]
    pub(crate) fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

struct KvWriter {
    kv: Arc<KvStore>,
    file: Option<File>,
    /// Valid bytes in the file.
    size: u64,
    /// Bytes of frames holding current values.
    live: u64,
    dirty: bool,
    healthy: Arc<AtomicBool>,
}

impl KvWriter {
    async fn run(mut self, mut rx: mpsc::Receiver<PutReq>) {
        let policy = self.kv.fsync;
        let mut tick = tokio::time::interval(self.kv.fsync_interval.max(Duration::from_millis(1)));
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
        if policy != FsyncPolicy::Never && self.dirty {
            self.sync().await;
        }
    }

    async fn sync(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        match tokio::task::spawn_blocking(move || {
            let res = file.sync_data();
            (file, res)
        })
        .await
        {
            Ok((file, Ok(()))) => {
                self.file = Some(file);
                self.dirty = false;
            }
            Ok((_, Err(e))) => {
                tracing::error!(store = ?self.kv.store, error = %e, "state fsync failed");
                self.healthy.store(false, Ordering::Release);
            }
            Err(e) => {
                tracing::error!(store = ?self.kv.store, error = %e, "state fsync task failed")
            }
        }
    }

    async fn write_batch(&mut self, batch: Vec<PutReq>) {
        let mut buf = Vec::new();
        for req in &batch {
            encode(&mut buf, &req.key, req.value.as_ref());
        }
        let sync = self.kv.fsync == FsyncPolicy::Always;
        let (file, path, size) = (self.file.take(), self.kv.path.clone(), self.size);
        let written = tokio::task::spawn_blocking(move || -> io::Result<File> {
            let mut file = match file {
                Some(f) => f,
                None => {
                    let f = OpenOptions::new().read(true).write(true).open(&path)?;
                    // Drop whatever a failed write may have left after the valid bytes.
                    f.set_len(size)?;
                    f
                }
            };
            file.seek(SeekFrom::Start(size))?;
            file.write_all(&buf)?;
            if sync {
                file.sync_data()?;
            }
            Ok(file)
        })
        .await
        .map_err(|e| io::Error::other(format!("state write task failed: {e}")))
        .and_then(|r| r);
        let file = match written {
            Ok(file) => file,
            Err(e) => {
                tracing::error!(store = ?self.kv.store, error = %e, "state write failed");
                self.healthy.store(false, Ordering::Release);
                for req in batch {
                    let _ = req.done.send(Err(BackendError::storage_io_copy(&e)));
                }
                return;
            }
        };
        self.file = Some(file);
        self.dirty = !sync;
        self.healthy.store(true, Ordering::Release);

        let mut updates = Vec::with_capacity(batch.len());
        let mut dones = Vec::with_capacity(batch.len());
        let subscribers = {
            let mut shared = self.kv.shared.lock();
            for req in batch {
                self.size += frame_size(&req.key, req.value.as_ref());
                let old = match &req.value {
                    Some(v) => {
                        self.live += frame_size(&req.key, Some(v));
                        shared.map.insert(req.key.clone(), v.clone())
                    }
                    None => shared.map.remove(&req.key),
                };
                if let Some(old) = old {
                    self.live = self.live.saturating_sub(frame_size(&req.key, Some(&old)));
                }
                updates.push(StateUpdate { store: self.kv.store, key: req.key, value: req.value });
                dones.push(req.done);
            }
            shared.subscribers.clone()
        };
        let mut gone = false;
        let mut closing = self.kv.closing.subscribe();
        'subscribers: for sub in &subscribers {
            for update in &updates {
                let sent = tokio::select! {
                    sent = sub.send(update.clone()) => Some(sent.is_ok()),
                    _ = closing.wait_for(|c| *c) => None,
                };
                match sent {
                    Some(true) => {}
                    Some(false) => {
                        gone = true;
                        break;
                    }
                    None => {
                        tracing::warn!(store = ?self.kv.store, "closing: state update not delivered to a full watcher");
                        break 'subscribers;
                    }
                }
            }
        }
        if gone {
            self.kv.shared.lock().subscribers.retain(|s| !s.is_closed());
        }
        for done in dones {
            let _ = done.send(Ok(()));
        }
        let dead = self.size.saturating_sub(self.live);
        if dead > self.live && dead > COMPACT_MIN_DEAD_BYTES {
            self.compact().await;
        }
    }

    /// Rewrite the file with only the live entries (temp file, fsync, rename).
    async fn compact(&mut self) {
        let entries: Vec<(String, Bytes)> = {
            let shared = self.kv.shared.lock();
            shared.map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let path = self.kv.path.clone();
        let result = tokio::task::spawn_blocking(move || -> io::Result<(File, u64)> {
            let tmp = path.with_extension("kv.compact");
            let mut buf = Vec::with_capacity(1024 * 1024);
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
            let mut size = 0u64;
            for (key, value) in &entries {
                encode(&mut buf, key, Some(value));
                if buf.len() >= 1024 * 1024 {
                    file.write_all(&buf)?;
                    size += buf.len() as u64;
                    buf.clear();
                }
            }
            file.write_all(&buf)?;
            size += buf.len() as u64;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
            Ok((file, size))
        })
        .await
        .map_err(|e| io::Error::other(format!("compaction task failed: {e}")))
        .and_then(|r| r);
        match result {
            Ok((file, size)) => {
                tracing::info!(store = ?self.kv.store, before = self.size, after = size, "state store compacted");
                self.file = Some(file);
                self.size = size;
                self.live = size;
                self.dirty = false;
            }
            // The old file is intact; compaction is retried after the next write.
            Err(e) => tracing::warn!(store = ?self.kv.store, error = %e, "state compaction failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        let v = Bytes::from_static(b"value");
        encode(&mut buf, "k1", Some(&v));
        encode(&mut buf, "k2", None);
        assert_eq!(buf.len() as u64, frame_size("k1", Some(&v)) + frame_size("k2", None));
        let mut r = &buf[..];
        let (body, _) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(decode(body), Some(("k1".to_owned(), Some(v))));
        let (body, _) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(decode(body), Some(("k2".to_owned(), None)));
    }

    async fn open(dir: &Path) -> Arc<KvStore> {
        let dir = dir.to_path_buf();
        let kv = tokio::task::spawn_blocking(move || {
            KvStore::load(StateStore::Sessions, &dir, FsyncPolicy::Never, Duration::from_millis(100))
        })
        .await
        .unwrap()
        .unwrap();
        let kv = Arc::new(kv);
        kv.start(Arc::new(AtomicBool::new(true)));
        kv
    }

    #[tokio::test]
    async fn compaction_keeps_latest_values_and_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path()).await;
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        // 3 MiB of overwrites of a few keys: compaction must kick in.
        for round in 0..16u8 {
            for k in 0..3 {
                let mut v = big.to_vec();
                v[0] = round;
                kv.put(format!("key{k}"), Some(Bytes::from(v))).await.unwrap();
            }
        }
        kv.put("gone".into(), Some(Bytes::from_static(b"x"))).await.unwrap();
        kv.put("gone".into(), None).await.unwrap();
        kv.put("small".into(), Some(Bytes::from_static(b"s"))).await.unwrap();
        assert!(kv.file_size() < 2 * 1024 * 1024, "not compacted: {}", kv.file_size());
        kv.close().await;

        let kv = open(dir.path()).await;
        for k in 0..3 {
            let v = kv.get(&format!("key{k}")).unwrap();
            assert_eq!((v[0], v.len()), (15, 64 * 1024));
        }
        assert_eq!(kv.get("gone"), None);
        assert_eq!(kv.get("small"), Some(Bytes::from_static(b"s")));
        kv.close().await;
    }

    #[tokio::test]
    async fn torn_tail_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path()).await;
        kv.put("a".into(), Some(Bytes::from_static(b"1"))).await.unwrap();
        kv.put("b".into(), Some(Bytes::from_static(b"2"))).await.unwrap();
        kv.close().await;
        let path = dir.path().join(file_name(StateStore::Sessions));
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 2).unwrap();
        drop(f);
        let kv = open(dir.path()).await;
        assert_eq!(kv.get("a"), Some(Bytes::from_static(b"1")));
        assert_eq!(kv.get("b"), None);
        kv.put("c".into(), Some(Bytes::from_static(b"3"))).await.unwrap();
        kv.close().await;
        let kv = open(dir.path()).await;
        assert_eq!(kv.get("c"), Some(Bytes::from_static(b"3")));
        kv.close().await;
    }
}
