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
use std::time::{Duration, Instant};

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

fn storage(e: impl std::fmt::Display) -> BackendError {
    BackendError::Storage(format!("state cache: {e}"))
}

/// One change read from the source topic.
pub struct Change<'a> {
    pub partition: u32,
    pub offset: u64,
    pub key: &'a str,
    /// `None`: deleted (tombstone).
    pub value: Option<&'a [u8]>,
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
                return Err(storage(format!(
                    "{} is in use by another gateway process (each needs its own directory)",
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
                Some(s) => return Err(storage(format!("filled from `{s}`, not `{source}`"))),
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
                match c.value {
                    Some(v) => {
                        values.insert(c.key, v).map_err(storage)?;
                    }
                    None => {
                        values.remove(c.key).map_err(storage)?;
                    }
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
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(VALUES).map_err(storage)?;
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        let range: (Bound<&str>, Bound<&str>) = (start, Bound::Unbounded);
        for entry in table.range(range).map_err(storage)?.take(limit) {
            let (k, v) = entry.map_err(storage)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn put<'a>(partition: u32, offset: u64, key: &'a str, value: Option<&'a [u8]>) -> Change<'a> {
        Change { partition, offset, key, value }
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
        s.clear().unwrap();
        assert!(s.is_empty().unwrap());
        assert!(s.offsets().unwrap().is_empty());
    }
}
