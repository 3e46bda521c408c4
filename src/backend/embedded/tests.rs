//! Unit tests of the embedded core service: recovery, segment rolling, retention.

use super::*;
use crate::config::FsyncPolicy;

fn config(dir: &Path) -> EmbeddedConfig {
    EmbeddedConfig {
        data_dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Never,
        fsync_interval_ms: 50,
        // Off: the background run at open uses the real clock and tests write old timestamps.
        retention_hours: 0,
        segment_bytes: 64 * 1024 * 1024,
        cache_records: 16,
        cache_bytes: 1 << 20,
    }
}

fn record(i: u64, ts: i64) -> CoreRecord {
    CoreRecord {
        key: None,
        headers: vec![("n".into(), Bytes::from(i.to_string()))],
        value: Bytes::from(vec![b'x'; 200]),
        timestamp_ms: ts,
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn torn_tail_is_truncated_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    for i in 0..10 {
        let pos = core.append("t", record(i, 1)).await.unwrap();
        assert_eq!(pos.offset, i);
    }
    core.shutdown().await;
    drop(core);

    // Cut the last record in half.
    let seg = segment_files(&dir.path().join("log/t/0")).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let frame = segment::frame_len(&record(9, 1)) as u64;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - frame / 2).unwrap();
    drop(f);

    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    let tp = TopicPartition::new("t", 0);
    assert_eq!(core.end_offset(&tp).await.unwrap(), 9);
    let got = core.fetch(&tp, 0, 100).await.unwrap();
    assert_eq!(got.records.len(), 9);
    assert_eq!(got.records[8].record.header("n").unwrap(), "8");
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len - frame);
    let pos = core.append("t", record(99, 1)).await.unwrap();
    assert_eq!(pos.offset, 9);
    let got = core.fetch(&tp, 9, 100).await.unwrap();
    assert_eq!(got.records.len(), 1);
    assert_eq!(got.records[0].record.header("n").unwrap(), "99");
    core.shutdown().await;
}

#[tokio::test]
async fn corrupt_byte_in_tail_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    for i in 0..5 {
        core.append("t", record(i, 1)).await.unwrap();
    }
    core.shutdown().await;
    drop(core);
    let seg = segment_files(&dir.path().join("log/t/0")).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    assert_eq!(core.end_offset(&TopicPartition::new("t", 0)).await.unwrap(), 4);
    core.shutdown().await;
}

#[tokio::test]
async fn segments_roll_and_fetch_spans_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 4096;
    cfg.cache_records = 4;
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    for i in 0..200 {
        core.append("t", record(i, 1)).await.unwrap();
    }
    let tp = TopicPartition::new("t", 0);
    let segs = segment_files(&dir.path().join("log/t/0"));
    assert!(segs.len() > 5, "segments: {}", segs.len());
    // From the start, across every segment (beyond the cache).
    let mut next = 0;
    let mut seen = 0;
    while next < 200 {
        let got = core.fetch(&tp, next, 37).await.unwrap();
        assert!(!got.records.is_empty());
        for r in &got.records {
            assert_eq!(r.offset, next + (r.offset - next));
            assert_eq!(r.record.header("n").unwrap(), r.offset.to_string().as_str());
        }
        assert_eq!(got.records[0].offset, next);
        seen += got.records.len();
        next = got.next_offset;
    }
    assert_eq!(seen, 200);
    // A middle offset, served through the sparse index.
    let got = core.fetch(&tp, 123, 3).await.unwrap();
    let offsets: Vec<u64> = got.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![123, 124, 125]);
    core.shutdown().await;
    drop(core);

    // Same after recovery.
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    let got = core.fetch(&tp, 57, 2).await.unwrap();
    assert_eq!(got.records[0].offset, 57);
    assert_eq!(got.records[1].offset, 58);
    assert_eq!(core.append("t", record(200, 1)).await.unwrap().offset, 200);
    core.shutdown().await;
}

#[tokio::test]
async fn the_cache_is_bounded_in_bytes_and_reads_beyond_it_come_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.cache_records = 1000;
    cfg.cache_bytes = 64 * 1024;
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    let big = |i: u64| CoreRecord { value: Bytes::from(vec![b'x'; 10_000]), ..record(i, 1) };
    for i in 0..50 {
        core.append("t", big(i)).await.unwrap();
    }
    let tp = TopicPartition::new("t", 0);
    let (records, bytes) = core.partition(&tp).unwrap().cache_usage();
    assert!(bytes <= 64 * 1024, "cache holds {bytes} bytes");
    assert!((5..=6).contains(&records), "cache holds {records} records of 10 kB");
    // A record larger than the whole cache empties it (the cache stays consecutive).
    core.append("t", CoreRecord { value: Bytes::from(vec![b'y'; 100_000]), ..record(50, 1) }).await.unwrap();
    assert_eq!(core.partition(&tp).unwrap().cache_usage(), (0, 0));
    core.append("t", big(51)).await.unwrap();
    assert_eq!(core.partition(&tp).unwrap().cache_usage().0, 1);
    // Every record is still readable, from disk below the cache.
    let mut next = 0;
    while next < 52 {
        let got = core.fetch(&tp, next, 7).await.unwrap();
        for r in &got.records {
            assert_eq!(r.record.header("n").unwrap(), r.offset.to_string().as_str());
        }
        next = got.next_offset;
    }
    core.shutdown().await;
}

#[tokio::test]
async fn retention_deletes_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 2048;
    cfg.cache_records = 1000;
    cfg.retention_hours = 1;
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    // The background retention run (real clock) must find nothing to delete, so the
    // "old" records are written at the real time and retention is run two hours later.
    let old = now_ms();
    let now = old + 2 * 3_600_000;
    for i in 0..50 {
        core.append("t", record(i, old)).await.unwrap();
    }
    for i in 50..60 {
        core.append("t", record(i, now)).await.unwrap();
    }
    let tp = TopicPartition::new("t", 0);
    let part = core.partition(&tp).unwrap();
    let before = part.segment_count();
    let deleted = core.run_retention_at(now).await;
    assert!(deleted > 0);
    assert_eq!(part.segment_count(), before - deleted);
    let start = part.log_start();
    assert!(start > 0 && start <= 50, "log start {start}");
    assert_eq!(segment_files(&dir.path().join("log/t/0")).len(), before - deleted);
    // Reading from 0 starts at the first retained record; nothing recent was lost.
    let got = core.fetch(&tp, 0, 1000).await.unwrap();
    assert_eq!(got.records[0].offset, start);
    assert_eq!(got.records.last().unwrap().offset, 59);
    // Nothing else is old enough.
    assert_eq!(core.run_retention_at(now).await, 0);
    core.shutdown().await;
    drop(core);
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    let got = core.fetch(&tp, 0, 1).await.unwrap();
    assert_eq!(got.records[0].offset, start);
    core.shutdown().await;
}

#[tokio::test]
async fn topic_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let core = EmbeddedCore::open(&config(dir.path()), "events").await.unwrap();
    for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0"] {
        assert!(core.ensure_topic(bad, 1).await.is_err(), "{bad:?}");
    }
    core.ensure_topic("GID_a-b.c", 2).await.unwrap();
    assert_eq!(core.partitions("GID_a-b.c").unwrap(), 2);
    core.ensure_topic("GID_a-b.c", 3).await.unwrap();
    assert_eq!(core.partitions("GID_a-b.c").unwrap(), 3);
    core.shutdown().await;
}

#[tokio::test]
async fn write_failure_fails_appends_and_availability() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 1;
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 1).await.unwrap();
    assert_eq!(core.append("t", record(0, 1)).await.unwrap().offset, 0);
    // The next append rolls to segment 1; a directory in its place makes that fail.
    let blocker = dir.path().join("log/t/0").join(segment::segment_file_name(1));
    std::fs::create_dir(&blocker).unwrap();
    match core.append("t", record(1, 1)).await {
        Err(BackendError::Storage { .. }) => {}
        other => panic!("expected a storage error, got {other:?}"),
    }
    assert!(!core.is_available());
    let tp = TopicPartition::new("t", 0);
    assert_eq!(core.end_offset(&tp).await.unwrap(), 1);
    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(core.append("t", record(2, 1)).await.unwrap().offset, 1);
    assert!(core.is_available());
    let got = core.fetch(&tp, 0, 10).await.unwrap();
    let names: Vec<_> = got.records.iter().map(|r| r.record.header("n").cloned().unwrap()).collect();
    assert_eq!(names, vec![Bytes::from("0"), Bytes::from("2")]);
    core.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_hang_on_a_stuck_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let core = EmbeddedCore::open(&config(dir.path()), "events").await.unwrap();
    let (tx, _rx) = mpsc::channel(1);
    core.watch_state(StateStore::Retained, tx).await.unwrap();
    let puts: Vec<_> = (0..3)
        .map(|i| tokio::spawn(core.put_state(StateStore::Retained, &format!("k{i}"), Some(Bytes::from_static(b"v")))))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::time::timeout(Duration::from_secs(5), core.shutdown()).await.expect("shutdown hung");
    for put in puts {
        let res = tokio::time::timeout(Duration::from_secs(5), put).await.expect("put hung").unwrap();
        // Written before the close (acknowledged) or refused as closed; never lost silently.
        assert!(matches!(res, Ok(()) | Err(BackendError::Closed)), "{res:?}");
    }
}

#[tokio::test]
async fn dropped_tail_and_core_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core.ensure_topic("t", 2).await.unwrap();
    let mut tail = core.tail();
    tail.assign(TopicPartition::new("t", 0), 0);
    tail.assign(TopicPartition::new("t", 1), 0);
    for i in 0..10 {
        core.append("t", record(i, 1)).await.unwrap();
    }
    let mut seen = 0;
    while seen < 10 {
        seen += tokio::time::timeout(Duration::from_secs(5), tail.poll()).await.unwrap().unwrap().len();
    }
    drop(tail);
    drop(core);
    // Writers stop on their own; the directory can be reopened.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let core = EmbeddedCore::open(&cfg, "events").await.unwrap();
    let total: u64 = futures::future::join_all((0..2).map(|p| core.end_offset(&TopicPartition::new("t", p))))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert_eq!(total, 10);
    core.shutdown().await;
}

/// Collects what a partition pushes.
#[derive(Default)]
struct Collect(parking_lot::Mutex<Vec<u64>>);

impl LiveSink for Collect {
    fn offer(&self, records: &[Arc<Record>]) {
        self.0.lock().extend(records.iter().map(|r| r.offset));
    }
}

#[tokio::test]
async fn records_are_pushed_from_the_registered_offset_on_in_order_once_per_sink() {
    let dir = tempfile::tempdir().unwrap();
    let core = EmbeddedCore::open(&config(dir.path()), "events").await.unwrap();
    core.ensure_topic("t", 2).await.unwrap();
    let tp = TopicPartition::new("t", 0);
    for i in 0..3 {
        core.append("t", CoreRecord { key: Some(Bytes::from_static(b"k")), ..record(i, 1) }).await.unwrap();
    }
    let sink = Arc::new(Collect::default());
    let weak: Weak<dyn LiveSink> = Arc::downgrade(&sink) as Weak<dyn LiveSink>;
    // The key picks one partition: register on that one.
    let (keyed, unkeyed) = match core.end_offset(&tp).await.unwrap() {
        3 => (tp, TopicPartition::new("t", 1)),
        _ => (TopicPartition::new("t", 1), tp),
    };
    let from = core.push_to(&keyed, weak.clone()).unwrap().unwrap();
    assert_eq!(from, 3);
    // Registering again adds nothing.
    assert_eq!(core.push_to(&keyed, weak).unwrap().unwrap(), 3);
    // Appends queued together become one batch; each record arrives once, in offset order,
    // and the acknowledgement comes after the push.
    let acks: Vec<_> = futures::future::join_all(
        (3..103).map(|i| core.enqueue("t", CoreRecord { key: Some(Bytes::from_static(b"k")), ..record(i, 1) })),
    )
    .await;
    for ack in acks {
        let pos = ack.unwrap().await.unwrap();
        assert!(sink.0.lock().contains(&pos.offset), "acknowledged before pushed: {}", pos.offset);
    }
    assert_eq!(*sink.0.lock(), (3..103).collect::<Vec<u64>>());
    // A dropped sink is not called (and is forgotten).
    drop(sink);
    core.append("t", CoreRecord { key: Some(Bytes::from_static(b"k")), ..record(0, 1) }).await.unwrap();
    // A sink registered on one partition gets nothing of another.
    let elsewhere = Arc::new(Collect::default());
    core.push_to(&unkeyed, Arc::downgrade(&elsewhere) as Weak<dyn LiveSink>).unwrap().unwrap();
    let pos = core.append("t", CoreRecord { key: Some(Bytes::from_static(b"k")), ..record(0, 1) }).await.unwrap();
    assert_eq!(pos.partition, keyed.partition);
    assert!(elsewhere.0.lock().is_empty());
    core.append("t", record(0, 1)).await.unwrap();
    core.append("t", record(0, 1)).await.unwrap();
    assert_eq!(elsewhere.0.lock().len(), 1, "round-robin: one of two unkeyed records");
    // A partition of a topic that does not exist cannot push.
    assert!(core.push_to(&TopicPartition::new("missing", 0), Weak::<Collect>::new()).unwrap().is_err());
}
