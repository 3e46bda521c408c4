//! A local, disposable materialisation of a keyed state store on disk, for core services whose
//! state lives in compacted topics (Kafka): the gateway keeps on disk what it would otherwise
//! hold in memory for the whole fleet, reads a key when a client needs it, and at start resumes
//! reading the topic from where the file left off instead of from the beginning.
//!
//! One [redb](https://docs.rs/redb) file `state.redb` in a directory the process holds an
//! exclusive lock on (`LOCK`). Tables: the values (key → bytes), the next offset to read per
//! partition of the source topic, and one `source` line naming the cluster and topic the file
//! was filled from: a file from another source, an unreadable file or offsets beyond the
//! topic's end (a topic deleted and created again) are discarded and the store is read again
//! from the beginning. Deleting the directory loses nothing.
//!
//! Values and offsets change in the same transaction, so after a crash the file is a state the
//! topic went through, at the offsets it records. Transactions are committed without fsync
//! (`Durability::None`) and made durable every [`DURABLE_EVERY`] and at close: a crash costs a
//! re-read of the last seconds of the topic, never a wrong value.

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use crate::backend::{BackendError, Result};

const VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("values");
/// Partition → next offset to read.
const OFFSETS: TableDefinition<u32, u64> = TableDefinition::new("offsets");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Transactions in between are committed without fsync.
pub const DURABLE_EVERY: Duration = Duration::from_secs(5);
/// redb's page cache: pages of the B-tree kept in memory (the OS caches the file too).
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// How long [`DiskState::open`] waits for another holder of the directory to let it go.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// A failure of the file (io, redb), kept as the error's source.
fn storage(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::storage_from("state cache", e)
}

/// One change read from the source topic.
pub struct Change<'a> {
    pub partition: u32,
    pub offset: u64,
    pub key: &'a str,
    /// `None`: deleted (tombstone).
    pub value: Option<&'a [u8]>,
    /// `Some(p)`: a conditional put, applied only while the key's current value starts with
    /// `p` (a record that renews the one a value comes from, see `rocketmq::state`).
    pub if_prefix: Option<&'a [u8]>,
}

pub struct DiskState {
    db: Database,
    /// Held for the lifetime of the store: one process per directory.
    _lock: File,
    dir: PathBuf,
    last_durable: parking_lot::Mutex<Instant>,
}

impl std::fmt::Debug for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskState").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl DiskState {
    /// Open (or create) the store in `dir` for `source` (a description of where its content
    /// comes from: cluster and topic). Another source's content, or an unreadable file, is
    /// discarded.
    pub fn open(dir: &Path, source: &str) -> Result<DiskState> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let lock = File::create(dir.join("LOCK")).map_err(storage)?;
        // A gateway that just stopped may still be letting its copy go: wait a little.
        let deadline = Instant::now() + LOCK_WAIT;
        while lock.try_lock().is_err() {
            if Instant::now() >= deadline {
                return Err(BackendError::storage(format!(
                    "state cache: {} is in use by another gateway process (each needs its own directory)",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let path = dir.join("state.redb");
        let db = match Self::open_db(&path, source) {
            Ok(db) => db,
            Err(e) => {
                if path.exists() {
                    tracing::warn!(path = %path.display(), error = %e, "state cache discarded; reading the store again");
                    std::fs::remove_file(&path).map_err(storage)?;
                }
                Self::open_db(&path, source)?
            }
        };
        Ok(DiskState { db, _lock: lock, dir: dir.to_owned(), last_durable: parking_lot::Mutex::new(Instant::now()) })
    }

    fn open_db(path: &Path, source: &str) -> Result<Database> {
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let current = meta.get("source").map_err(storage)?.map(|v| v.value().to_owned());
            match current {
                Some(s) if s == source => {}
                Some(s) => {
                    return Err(BackendError::storage(format!("state cache: filled from `{s}`, not `{source}`")))
                }
                None => {
                    meta.insert("source", source).map_err(storage)?;
                }
            }
            txn.open_table(VALUES).map_err(storage)?;
            txn.open_table(OFFSETS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(db)
    }

    /// Next offset to read per partition (partitions never read are absent).
    pub fn offsets(&self) -> Result<HashMap<u32, u64>> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(OFFSETS).map_err(storage)?;
        let mut out = HashMap::new();
        for entry in table.iter().map_err(storage)? {
            let (p, o) = entry.map_err(storage)?;
            out.insert(p.value(), o.value());
        }
        Ok(out)
    }

    /// Forget everything (the source topic was created again): read it from the beginning.
    pub fn clear(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.delete_table(VALUES).map_err(storage)?;
        txn.delete_table(OFFSETS).map_err(storage)?;
        txn.open_table(VALUES).map_err(storage)?;
        txn.open_table(OFFSETS).map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Apply changes in one transaction; each partition's next offset moves past its last
    /// change. Changes below a partition's next offset (repeats) are skipped.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(storage)?;
        let durable = {
            let mut last = self.last_durable.lock();
            if last.elapsed() >= DURABLE_EVERY {
                *last = Instant::now();
                true
            } else {
                false
            }
        };
        if !durable {
            txn.set_durability(Durability::None).map_err(storage)?;
        }
        {
            let mut values = txn.open_table(VALUES).map_err(storage)?;
            let mut offsets = txn.open_table(OFFSETS).map_err(storage)?;
            let mut next: HashMap<u32, u64> = HashMap::new();
            for c in changes {
                let at = match next.get(&c.partition) {
                    Some(n) => *n,
                    None => offsets.get(c.partition).map_err(storage)?.map_or(0, |v| v.value()),
                };
                if c.offset < at {
                    continue;
                }
                let applies = match c.if_prefix {
                    None => true,
                    Some(p) => values.get(c.key).map_err(storage)?.is_some_and(|v| v.value().starts_with(p)),
                };
                match c.value {
                    Some(v) if applies => {
                        values.insert(c.key, v).map_err(storage)?;
                    }
                    None if applies => {
                        values.remove(c.key).map_err(storage)?;
                    }
                    _ => {}
                }
                next.insert(c.partition, c.offset + 1);
            }
            for (p, o) in next {
                offsets.insert(p, o).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// Make everything applied so far durable.
    pub fn flush(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.commit().map_err(storage)?;
        *self.last_durable.lock() = Instant::now();
        Ok(())
    }

    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(VALUES).map_err(storage)?;
        let value = table.get(key).map_err(storage)?.map(|v| Bytes::copy_from_slice(v.value()));
        Ok(value)
    }

    /// Up to `limit` entries in key order, after `after` (from the first with `None`).
    pub fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, Bytes)>> {
        self.scan_prefix("", after, limit)
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order, after the key
    /// `prefix + after` (from the first with `None`). The keys returned are whole.
    pub fn scan_prefix(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<(String, Bytes)>> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(VALUES).map_err(storage)?;
        let after = after.map(|a| format!("{prefix}{a}"));
        let start = match &after {
            Some(a) => Bound::Excluded(a.as_str()),
            None => Bound::Included(prefix),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        let range: (Bound<&str>, Bound<&str>) = (start, Bound::Unbounded);
        for entry in table.range(range).map_err(storage)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(storage)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), Bytes::copy_from_slice(v.value())));
        }
        Ok(out)
    }

    /// Number of keys.
    pub fn len(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(VALUES).map_err(storage)?;
        table.len().map_err(storage)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// A [`Change`], owned, on its way to a [`DiskStore`]'s thread (`key` `None`: a record whose
/// key is not UTF-8, passed over).
#[derive(Clone, Debug)]
pub struct OwnedChange {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<String>,
    pub value: Option<Bytes>,
    pub if_prefix: Option<Bytes>,
}

type Page = Vec<(String, Bytes)>;

enum Job {
    Write(Arc<Vec<OwnedChange>>, oneshot::Sender<Result<()>>),
    Scan { prefix: String, after: Option<String>, limit: usize, done: oneshot::Sender<Result<Page>> },
    Stop,
}

/// A [`DiskState`] and the thread that writes it and pages through it. Writes and scans run
/// on one thread of their own rather than on tokio's blocking pool: redb's page buffers are
/// then allocated and freed on the same thread (spread over the pool's threads, the allocator
/// kept freed pages per thread and a cold fill of 1 M sessions grew the process to 1.3 GiB).
/// Point reads ([`DiskStore::get`], a session's CONNECT) stay on the pool, so they never
/// queue behind a write.
pub struct DiskStore {
    /// `None` once closed.
    file: parking_lot::RwLock<Option<Arc<DiskState>>>,
    jobs: parking_lot::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").field("file", &*self.file.read()).finish_non_exhaustive()
    }
}

impl DiskStore {
    /// Start the thread (`lmq-state-<name>`) that writes `file`.
    pub fn start(name: &str, file: DiskState) -> Result<DiskStore> {
        let file = Arc::new(file);
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let disk = file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lmq-state-{name}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Write(batch, done) => {
                            let changes: Vec<Change<'_>> = batch
                                .iter()
                                .filter_map(|c| {
                                    Some(Change {
                                        partition: c.partition,
                                        offset: c.offset,
                                        key: c.key.as_deref()?,
                                        value: c.value.as_deref(),
                                        if_prefix: c.if_prefix.as_deref(),
                                    })
                                })
                                .collect();
                            let _ = done.send(disk.apply(&changes));
                        }
                        Job::Scan { prefix, after, limit, done } => {
                            let _ = done.send(disk.scan_prefix(&prefix, after.as_deref(), limit));
                        }
                        Job::Stop => return,
                    }
                }
            })
            .map_err(storage)?;
        Ok(DiskStore {
            file: parking_lot::RwLock::new(Some(file)),
            jobs: parking_lot::Mutex::new(Some(jobs)),
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    /// The file, for reads on the caller's thread; `Closed` once closed.
    pub fn file(&self) -> Result<Arc<DiskState>> {
        self.file.read().clone().ok_or(BackendError::Closed)
    }

    fn send(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.lock();
        jobs.as_ref().ok_or(BackendError::Closed)?.send(job).map_err(|_| BackendError::Closed)
    }

    /// Apply changes in one transaction, on the store's thread.
    pub async fn write(&self, changes: Arc<Vec<OwnedChange>>) -> Result<()> {
        let (done, written) = oneshot::channel();
        self.send(Job::Write(changes, done))?;
        written.await.unwrap_or(Err(BackendError::Closed))
    }

    /// [`DiskState::scan_prefix`] on the store's thread.
    pub async fn scan(&self, prefix: &str, after: Option<String>, limit: usize) -> Result<Page> {
        let (done, page) = oneshot::channel();
        self.send(Job::Scan { prefix: prefix.to_owned(), after, limit, done })?;
        page.await.unwrap_or(Err(BackendError::Closed))
    }

    /// A key's value, read on the blocking pool.
    pub async fn get(&self, key: String) -> Result<Option<Bytes>> {
        let file = self.file()?;
        tokio::task::spawn_blocking(move || file.get(&key))
            .await
            .unwrap_or_else(|e| Err(BackendError::storage_from("state cache: read task failed", e)))
    }

    /// Stop the thread (after the job in progress) and make the file durable (at shutdown).
    /// Later calls fail with [`BackendError::Closed`]; the directory is free once reads in
    /// flight end.
    pub fn close(&self) {
        if let Some(jobs) = self.jobs.lock().take() {
            let _ = jobs.send(Job::Stop);
        }
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
        if let Some(file) = self.file.write().take() {
            if let Err(e) = file.flush() {
                tracing::warn!(error = %e, "state cache: final flush failed (the next start reads more)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put<'a>(partition: u32, offset: u64, key: &'a str, value: Option<&'a [u8]>) -> Change<'a> {
        Change { partition, offset, key, value, if_prefix: None }
    }

    #[test]
    fn values_and_offsets_survive_a_reopen_and_repeats_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskState::open(dir.path(), "kafka:a/sessions").unwrap();
            s.apply(&[put(0, 0, "a", Some(b"1")), put(1, 0, "b", Some(b"2")), put(0, 1, "a", Some(b"3"))]).unwrap();
            s.apply(&[put(1, 1, "b", None), put(0, 2, "c", Some(b"4"))]).unwrap();
            // A repeat of an offset already applied changes nothing.
            s.apply(&[put(0, 1, "c", Some(b"old"))]).unwrap();
            s.flush().unwrap();
        }
        let s = DiskState::open(dir.path(), "kafka:a/sessions").unwrap();
        assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"3"[..]));
        assert_eq!(s.get("b").unwrap(), None);
        assert_eq!(s.get("c").unwrap().as_deref(), Some(&b"4"[..]));
        assert_eq!(s.offsets().unwrap(), HashMap::from([(0, 3), (1, 2)]));
        assert_eq!(s.len().unwrap(), 2);
    }

    #[test]
    fn another_source_starts_empty_and_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskState::open(dir.path(), "kafka:a/sessions").unwrap();
            s.apply(&[put(0, 0, "a", Some(b"1"))]).unwrap();
            assert!(DiskState::open(dir.path(), "kafka:a/sessions").is_err(), "the directory is locked");
        }
        let s = DiskState::open(dir.path(), "kafka:b/sessions").unwrap();
        assert_eq!(s.get("a").unwrap(), None);
        assert!(s.offsets().unwrap().is_empty());
    }

    #[test]
    fn scan_pages_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskState::open(dir.path(), "x").unwrap();
        let keys: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
        let changes: Vec<Change<'_>> =
            keys.iter().enumerate().map(|(i, k)| put(0, i as u64, k, Some(k.as_bytes()))).collect();
        s.apply(&changes).unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = s.scan(after.as_deref(), 10).unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|(k, _)| k.clone());
            seen.extend(page.into_iter().map(|(k, _)| k));
        }
        assert_eq!(seen, keys);
        // A prefix bounds the page on both sides; `after` is relative to the prefix.
        s.apply(&[put(0, 25, "a/1", Some(b"x")), put(0, 26, "a/2", Some(b"y")), put(0, 27, "b/1", Some(b"z"))])
            .unwrap();
        let page: Vec<String> = s.scan_prefix("a/", None, 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(page, ["a/1", "a/2"]);
        let page: Vec<String> = s.scan_prefix("a/", Some("1"), 10).unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(page, ["a/2"]);
        s.clear().unwrap();
        assert!(s.is_empty().unwrap());
        assert!(s.offsets().unwrap().is_empty());
    }
}
