//! The embedded core service across crashes, with `fsync: always`: a gateway process killed
//! with SIGKILL mid-stream loses no acknowledged message, and a persistent subscriber that was
//! reading while it died gets every one of them after the restart (no offset it had seen is
//! given to another record); a torn or corrupted segment tail is cut back on restart and the
//! log goes on from there; QoS 2 is stored once across a SIGKILL (the check of
//! `tests/hostile/crash.rs`, which `tests/kafka.rs` and `tests/rocketmq.rs` run on the brokers).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;

use bytes::BytesMut;
use common::{connect_packet, free_addr, publish_pipelined, GatewayProcess, Pace, FULL_SPEED};
use lmq_gateway::protocol::{self, Packet, Protocol, PubResponse};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

for_each_crash_check!(on_embedded);

/// The real binary on a fixed port and data directory (`dir/data`, `fsync: always`), killable
/// with SIGKILL.
fn gateway_process(dir: &Path, addr: SocketAddr) -> GatewayProcess {
    GatewayProcess::options(&format!(
        "core:\n  embedded:\n    data_dir: {}\n    fsync: always\n\
         auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n",
        dir.join("data").display()
    ))
    .addr(addr)
    .dir(dir)
    .start()
}

/// A persistent (clean session 0) QoS 1 subscriber over a raw socket that acknowledges
/// every message and collects the payloads, until the connection ends, nothing comes for
/// `idle`, or (once subscribed) `until` holds.
async fn persistent_subscriber(
    addr: SocketAddr,
    id: &str,
    filter: &str,
    got: &mut BTreeSet<u32>,
    until: impl Fn(&BTreeSet<u32>) -> bool,
    idle: Duration,
) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return };
    let mut out = BytesMut::new();
    let _ = protocol::encode(&connect_packet(id, Protocol::V311, false), Protocol::V311, &mut out);
    let sub = Packet::Subscribe(protocol::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).expect("non-zero"),
        filters: vec![(
            filter.into(),
            protocol::SubscriptionOptions { qos: protocol::QoS::AtLeastOnce, ..Default::default() },
        )],
        properties: Default::default(),
    });
    let _ = protocol::encode(&sub, Protocol::V311, &mut out);
    if s.write_all(&out).await.is_err() {
        return;
    }
    let mut buf = BytesMut::new();
    let mut subscribed = false;
    loop {
        while let Ok(Some(p)) = protocol::decode(&mut buf, Protocol::V311, 1 << 20) {
            if matches!(p, Packet::SubAck(_)) {
                subscribed = true;
            }
            if let Packet::Publish(m) = p {
                if let Some(n) = std::str::from_utf8(&m.payload).ok().and_then(|t| t.parse().ok()) {
                    got.insert(n);
                }
                if let Some(id) = m.packet_id {
                    out.clear();
                    let _ = protocol::encode(&Packet::PubAck(PubResponse::new(id)), Protocol::V311, &mut out);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        }
        if subscribed && until(got) {
            return;
        }
        match tokio::time::timeout(idle, s.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message_and_a_persistent_subscriber_gets_them_all() {
    const TOTAL: u32 = 5_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut gw = gateway_process(dir.path(), addr);

    // The subscriber's session exists before publishing starts.
    let mut got = BTreeSet::new();
    persistent_subscriber(addr, "crash-sub", "crash/#", &mut got, |_| true, Duration::from_millis(200)).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let mut acked = BTreeSet::new();
    // Publishing starts once the subscriber is back in its session, so that the kill finds it
    // reading however slowly the machine brings it up.
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let received = Arc::new(AtomicUsize::new(0));
    let subscriber = {
        let mut got = BTreeSet::new();
        let subscribed = subscribed.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let until = |got: &BTreeSet<u32>| {
                subscribed.notify_one();
                received.store(got.len(), Ordering::Relaxed);
                false
            };
            persistent_subscriber(addr, "crash-sub", "crash/#", &mut got, until, Duration::from_secs(30)).await;
            got
        })
    };
    tokio::time::timeout(Duration::from_secs(10), subscribed.notified()).await.expect("the subscriber is back");
    // Paced so that the kill comes mid-stream with the subscriber reading: once a quarter is
    // acknowledged and the subscriber has had deliveries, however slowly a loaded machine
    // brings them (2.5 s of publishing leaves it about 2 s).
    let pace = Pace { window: 100, rate: Some(2_000.0) };
    let seen = progress.clone();
    let killer = tokio::spawn(async move {
        while seen.load(Ordering::Relaxed) < TOTAL as usize / 4 || received.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        gw.sigkill();
    });
    let mut next = publish_pipelined(addr, "crash-pub", "crash/a", 0, TOTAL, pace, &mut acked, &progress).await;
    killer.await.expect("killer");
    assert!(next < TOTAL, "the gateway was killed mid-stream ({} acknowledged before)", acked.len());
    let before_kill: BTreeSet<u32> = subscriber.await.expect("subscriber");
    assert!(!before_kill.is_empty(), "the subscriber was reading before the kill");

    // Restart on the same data; publishing goes on from the first unacknowledged message.
    let gw = gateway_process(dir.path(), addr);
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < TOTAL {
        assert!(Instant::now() < deadline, "publishing did not finish");
        next = publish_pipelined(addr, "crash-pub", "crash/a", next, TOTAL, FULL_SPEED, &mut acked, &progress).await;
    }

    // The persistent subscriber comes back and gets every acknowledged message it had not
    // acknowledged itself before the kill.
    let mut after = BTreeSet::new();
    let want = acked.clone();
    let missing_of = |got: &BTreeSet<u32>| want.iter().filter(|n| !got.contains(n)).count();
    let mut all = before_kill.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while missing_of(&all) > 0 && Instant::now() < deadline {
        let have = all.clone();
        persistent_subscriber(
            addr,
            "crash-sub",
            "crash/#",
            &mut after,
            |g| want.iter().all(|n| g.contains(n) || have.contains(n)),
            Duration::from_secs(3),
        )
        .await;
        all.extend(after.iter().copied());
    }
    let missing: Vec<&u32> = acked.iter().filter(|n| !all.contains(n)).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never reached the persistent subscriber, e.g. {missing:?}",
        missing_of(&all)
    );
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_segment_tail_is_cut_back_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let gw = gateway_process(dir.path(), addr);
    let progress = AtomicUsize::new(0);
    let mut acked = BTreeSet::new();
    assert_eq!(publish_pipelined(addr, "torn-pub", "torn/a", 0, 200, FULL_SPEED, &mut acked, &progress).await, 200);
    drop(gw);

    // A crash in the middle of a write: half a record of garbage after the last good one in
    // every segment file of the topic.
    let mut torn = 0;
    for entry in walk(&dir.path().join("data")) {
        let name = entry.to_string_lossy().into_owned();
        if name.contains("torn") && name.ends_with(".seg") {
            let mut f = std::fs::OpenOptions::new().append(true).open(&entry).expect("segment");
            std::io::Write::write_all(&mut f, &[0x5a; 37]).expect("tear");
            torn += 1;
        }
    }
    assert!(torn > 0, "no segment file of the topic found under {}", dir.path().display());

    // Restart: the 200 acknowledged messages are all there, and new ones follow them.
    let gw = gateway_process(dir.path(), addr);
    let progress = AtomicUsize::new(0);
    assert_eq!(publish_pipelined(addr, "torn-pub", "torn/a", 200, 300, FULL_SPEED, &mut acked, &progress).await, 300);
    // The log itself is read once the gateway is gone.
    drop(gw);
    let mut got: Vec<u32> = log_payloads(dir.path(), "torn").await.iter().filter_map(|t| t.parse().ok()).collect();
    got.sort_unstable();
    let expected: Vec<u32> = (0..300).collect();
    assert_eq!(got, expected, "every acknowledged message, before and after the torn tail, is in the log once");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every record of `topic` in the embedded log under `dir` (the gateway must be stopped).
async fn log_payloads(dir: &Path, topic: &str) -> Vec<String> {
    use lmq_gateway::backend::{CoreService, TopicPartition};
    let cfg = lmq_gateway::config::EmbeddedConfig {
        data_dir: dir.join("data"),
        ..lmq_gateway::config::EmbeddedConfig::default()
    };
    let core = lmq_gateway::backend::embedded::EmbeddedCore::open(&cfg, "GID_LMQ_STATUS").await.expect("reopen");
    let mut out = Vec::new();
    for p in 0..core.partitions(topic).unwrap_or(0) {
        let tp = TopicPartition::new(topic, p);
        let mut from = 0;
        loop {
            let batch = core.fetch(&tp, from, 1000).await.expect("fetch");
            if batch.records.is_empty() {
                break;
            }
            for r in &batch.records {
                out.push(String::from_utf8_lossy(&r.record.value).into_owned());
                from = r.offset + 1;
            }
        }
    }
    core.shutdown().await;
    out
}
