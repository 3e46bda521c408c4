//! Runs the backend conformance suite against the embedded core service, plus
//! embedded-specific checks (restart recovery, a throughput measurement).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[macro_use]
mod conformance;

use bytes::Bytes;
use lmq_gateway::backend::embedded::EmbeddedCore;
use lmq_gateway::backend::{CoreService, StateStore, TopicPartition};
use lmq_gateway::config::{EmbeddedConfig, FsyncPolicy};
use std::sync::Arc;
use std::time::Instant;

const EVENTS: &str = "GID_LMQ_STATUS";

fn config(dir: &std::path::Path) -> EmbeddedConfig {
    EmbeddedConfig {
        data_dir: dir.to_path_buf(),
        fsync: FsyncPolicy::Always,
        fsync_interval_ms: 100,
        retention_hours: 72,
        segment_bytes: 1024 * 1024,
        cache_records: 1000,
        cache_bytes: 8 << 20,
    }
}

async fn open(dir: &tempfile::TempDir) -> Arc<EmbeddedCore> {
    EmbeddedCore::open(&config(dir.path()), EVENTS).await.expect("open embedded core")
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = tempfile::tempdir().unwrap();
            let core = open(&dir).await;
            conformance::$name(core.as_ref(), stringify!($name)).await;
            core.shutdown().await;
        }
    )*};
}

for_each_check!(conformance);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written() {
    let dir = tempfile::tempdir().unwrap();
    let core = open(&dir).await;
    conformance::events_written(core.as_ref(), EVENTS, "client-events-1").await;
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything() {
    restart_keeps_everything_with(FsyncPolicy::Always).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_fsync_interval() {
    restart_keeps_everything_with(FsyncPolicy::Interval).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_fsync_never() {
    restart_keeps_everything_with(FsyncPolicy::Never).await;
}

async fn open_with(dir: &tempfile::TempDir, fsync: FsyncPolicy) -> Arc<EmbeddedCore> {
    let mut cfg = config(dir.path());
    cfg.fsync = fsync;
    cfg.fsync_interval_ms = 10;
    EmbeddedCore::open(&cfg, EVENTS).await.expect("open embedded core")
}

async fn restart_keeps_everything_with(fsync: FsyncPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let core = open_with(&dir, fsync).await;
    core.ensure_topic("restart", 3).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..60 {
        let key = format!("k{}", i % 7);
        let rec = conformance::record(Some(&key), &format!("v{i}"));
        let pos = core.append("restart", rec.clone()).await.unwrap();
        sent.push((pos, rec));
    }
    core.put_state(StateStore::Sessions, "c1", Some(Bytes::from_static(b"s1"))).await.unwrap();
    core.put_state(StateStore::Sessions, "c2", Some(Bytes::from_static(b"s2"))).await.unwrap();
    core.put_state(StateStore::Sessions, "c2", None).await.unwrap();
    core.put_state(StateStore::Retained, "a/b", Some(Bytes::from_static(b"r"))).await.unwrap();
    core.put_state(StateStore::Credentials, "dak1", Some(Bytes::from_static(b"cred"))).await.unwrap();
    core.put_state(StateStore::RevokedTokens, "jti1", Some(Bytes::from_static(b"rev"))).await.unwrap();
    let ends: Vec<u64> = futures::future::join_all((0..3).map(|p| core.end_offset(&TopicPartition::new("restart", p))))
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    // Let an interval fsync happen while idle.
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    core.shutdown().await;
    drop(core);

    let core = open_with(&dir, fsync).await;
    assert!(core.is_available());
    assert_eq!(core.partitions("restart").unwrap(), 3);
    for (p, end) in ends.iter().enumerate() {
        let tp = TopicPartition::new("restart", p as u32);
        assert_eq!(core.end_offset(&tp).await.unwrap(), *end);
    }
    for (pos, rec) in &sent {
        let tp = TopicPartition::new("restart", pos.partition);
        let got = core.fetch(&tp, pos.offset, 1).await.unwrap();
        assert_eq!(&got.records[0].record, rec);
    }
    assert_eq!(core.get_state(StateStore::Sessions, "c1").await.unwrap(), Some(Bytes::from_static(b"s1")));
    assert_eq!(core.get_state(StateStore::Sessions, "c2").await.unwrap(), None);
    assert_eq!(core.get_state(StateStore::Credentials, "dak1").await.unwrap(), Some(Bytes::from_static(b"cred")));
    assert_eq!(core.get_state(StateStore::RevokedTokens, "jti1").await.unwrap(), Some(Bytes::from_static(b"rev")));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let retained = core.watch_state(StateStore::Retained, tx).await.unwrap();
    assert_eq!(retained, vec![("a/b".to_owned(), Bytes::from_static(b"r"))]);
    // Offsets continue where they stopped.
    let pos = core.append("restart", conformance::record(Some("k0"), "after")).await.unwrap();
    assert_eq!(pos.offset, ends[pos.partition as usize]);
    assert_eq!(core.partitions(EVENTS).unwrap(), 1);
    core.shutdown().await;
}

/// `cargo test --release --test backend_embedded -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run in release mode"]
async fn throughput_fsync_always() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 20_000;
    for partitions in [1u32, 4] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 64 * 1024 * 1024;
        let core = EmbeddedCore::open(&cfg, EVENTS).await.unwrap();
        core.ensure_topic("bench", partitions).await.unwrap();
        let started = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let core = Arc::clone(&core);
                tokio::spawn(async move {
                    let key = Bytes::from(format!("client-{t}"));
                    for _ in 0..PER_TASK {
                        let rec = lmq_gateway::backend::CoreRecord {
                            key: Some(key.clone()),
                            headers: vec![],
                            value: Bytes::from_static(&[b'x'; 100]),
                            timestamp_ms: conformance::now_ms(),
                        };
                        core.append("bench", rec).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let total = (TASKS * PER_TASK) as f64;
        println!(
            "fsync=always partitions={partitions} tasks={TASKS}: {total} appends in {secs:.2}s = {:.0} appends/s",
            total / secs
        );
        core.shutdown().await;
    }
}
