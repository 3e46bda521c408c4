//! The embedded core service across crashes, with `fsync: always`: a gateway process killed
//! with SIGKILL mid-stream loses no acknowledged message, and a persistent subscriber that was
//! reading while it died gets every one of them after the restart (no offset it had seen is
//! given to another record); a torn or corrupted segment tail is cut back on restart and the
//! log goes on from there.

mod common;

use bytes::BytesMut;
use common::{connect_packet, publish_pipelined, Pace, FULL_SPEED};
use lmq_gateway::protocol::{self, Packet, Protocol, PubResponse};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The real binary on a fixed port and data directory, killable with SIGKILL.
struct GatewayProcess {
    child: Child,
}

impl GatewayProcess {
    fn start(dir: &Path, addr: SocketAddr) -> GatewayProcess {
        let config = dir.join("gateway.yaml");
        std::fs::write(
            &config,
            format!(
                "listeners:\n  - name: tcp\n    bind: {addr}\ncore:\n  embedded:\n    data_dir: {}\n    fsync: always\n\
                 auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n",
                dir.join("data").display()
            ),
        )
        .expect("write config");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gateway.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn gateway");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "gateway did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        GatewayProcess { child }
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr")
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
    let mut gw = GatewayProcess::start(dir.path(), addr);

    // The subscriber's session exists before publishing starts.
    let mut got = BTreeSet::new();
    persistent_subscriber(addr, "crash-sub", "crash/#", &mut got, |_| true, Duration::from_millis(200)).await;

    let progress = Arc::new(AtomicUsize::new(0));
    let mut acked = BTreeSet::new();
    let subscriber = {
        let mut got = BTreeSet::new();
        tokio::spawn(async move {
            persistent_subscriber(addr, "crash-sub", "crash/#", &mut got, |_| false, Duration::from_secs(30)).await;
            got
        })
    };
    // Paced so that the kill comes mid-stream with the subscriber reading.
    let pace = Pace { window: 100, rate: Some(5_000.0) };
    let seen = progress.clone();
    let killer = tokio::spawn(async move {
        while seen.load(Ordering::Relaxed) < TOTAL as usize / 4 {
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
    let gw = GatewayProcess::start(dir.path(), addr);
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
    let gw = GatewayProcess::start(dir.path(), addr);
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
    let gw = GatewayProcess::start(dir.path(), addr);
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

fn qos2_publish(pid: u16, dup: bool, payload: &str) -> Packet {
    Packet::Publish(protocol::Publish {
        dup,
        qos: protocol::QoS::ExactlyOnce,
        retain: false,
        topic: "exactly/once".into(),
        packet_id: std::num::NonZeroU16::new(pid),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        properties: Default::default(),
    })
}

/// QoS 2 is exactly once: a copy re-sent (DUP) while the first is still being stored is not
/// stored again, and a PUBLISH the gateway PUBRECed is recognised when re-sent after the
/// gateway was killed with SIGKILL and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_is_stored_once_across_a_duplicate_and_a_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut gw = GatewayProcess::start(dir.path(), addr);

    // A persistent session (clean session 0) publishing QoS 2.
    let mut c = common::Raw::connect(addr, Protocol::V311).await;
    c.send(&connect_packet("qos2-pub", Protocol::V311, false)).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // The first PUBLISH and its DUP copy in one write: the copy arrives while the first is
    // being stored.
    let mut both = BytesMut::new();
    protocol::encode(&qos2_publish(7, false, "dup-while-storing"), Protocol::V311, &mut both).expect("encode");
    protocol::encode(&qos2_publish(7, true, "dup-while-storing"), Protocol::V311, &mut both).expect("encode");
    c.send_bytes(&both).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 7));
    c.send(&Packet::PubRel(PubResponse::new(std::num::NonZeroU16::new(7).expect("id")))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id.get() == 7));

    // PUBRECed, then the gateway dies before the PUBREL.
    c.send(&qos2_publish(8, false, "pubreced-then-killed")).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 8));
    gw.sigkill();
    drop(c);

    // The client comes back to its session and sends the PUBLISH again (DUP), as MQTT has it.
    let gw = GatewayProcess::start(dir.path(), addr);
    let mut c = common::Raw::connect(addr, Protocol::V311).await;
    c.send(&connect_packet("qos2-pub", Protocol::V311, false)).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.session_present));
    c.send(&qos2_publish(8, true, "pubreced-then-killed")).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.packet_id.get() == 8));
    c.send(&Packet::PubRel(PubResponse::new(std::num::NonZeroU16::new(8).expect("id")))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id.get() == 8));
    drop(c);
    drop(gw);

    let mut stored = log_payloads(dir.path(), "exactly").await;
    stored.sort();
    assert_eq!(stored, vec!["dup-while-storing".to_string(), "pubreced-then-killed".to_string()], "stored once each");
}

/// Client side of pipelined QoS 2 publishing (persistent session): which messages are sent
/// without PUBREC, PUBRECed without PUBCOMP, and complete.
struct Qos2Publisher {
    raw: common::Raw,
    next: u32,
    unrec: BTreeSet<u32>,
    released: BTreeSet<u32>,
    complete: BTreeSet<u32>,
}

impl Qos2Publisher {
    async fn connect(addr: SocketAddr, resumed: bool) -> common::Raw {
        let mut raw = common::Raw::connect(addr, Protocol::V311).await;
        raw.send(&connect_packet("qos2-window", Protocol::V311, false)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) => assert_eq!(a.session_present, resumed, "session present"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    fn id(n: u32) -> std::num::NonZeroU16 {
        std::num::NonZeroU16::new(u16::try_from(n + 1).expect("small")).expect("non-zero")
    }

    /// Keep `window` PUBLISHes in flight until `total` are complete or `stop` says so.
    async fn run(&mut self, total: u32, window: usize, stop: impl Fn(&Self) -> bool) {
        while self.complete.len() < total as usize && !stop(self) {
            while self.next < total && self.unrec.len() + self.released.len() < window {
                self.raw.send(&qos2_publish(Self::id(self.next).get(), false, &self.next.to_string())).await;
                self.unrec.insert(self.next);
                self.next += 1;
            }
            match self.raw.recv().await {
                Some(Packet::PubRec(r)) => {
                    let n = u32::from(r.packet_id.get()) - 1;
                    if self.unrec.remove(&n) {
                        self.released.insert(n);
                    }
                    self.raw.send(&Packet::PubRel(PubResponse::new(r.packet_id))).await;
                }
                Some(Packet::PubComp(r)) => {
                    let n = u32::from(r.packet_id.get()) - 1;
                    self.released.remove(&n);
                    self.complete.insert(n);
                }
                other => panic!("expected PUBREC or PUBCOMP, got {other:?}"),
            }
        }
    }

    /// Back on the session after a gateway died: re-send what has no PUBREC (DUP) and the
    /// PUBRELs of what has no PUBCOMP [MQTT-4.4.0-1].
    async fn resume(&mut self, addr: SocketAddr) {
        self.raw = Self::connect(addr, true).await;
        for n in self.unrec.clone() {
            self.raw.send(&qos2_publish(Self::id(n).get(), true, &n.to_string())).await;
        }
        for n in self.released.clone() {
            self.raw.send(&Packet::PubRel(PubResponse::new(Self::id(n)))).await;
        }
    }
}

/// QoS 2 exactly once across a SIGKILL at any point: records appended whose session save had
/// not happened yet (no PUBREC sent) are recognised when the client re-sends them.
#[tokio::test]
async fn qos2_pipelined_is_stored_once_across_a_sigkill_mid_stream() {
    const TOTAL: u32 = 3000;
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = free_addr();
    let mut gw = GatewayProcess::start(dir.path(), addr);
    let mut c = Qos2Publisher {
        raw: Qos2Publisher::connect(addr, false).await,
        next: 0,
        unrec: BTreeSet::new(),
        released: BTreeSet::new(),
        complete: BTreeSet::new(),
    };
    // Killed several times, at different moments of the stream.
    let mut resent = 0;
    for round in 1..=6u64 {
        let goal = round as usize * TOTAL as usize / 8;
        c.run(TOTAL, 64, |c| c.complete.len() >= goal).await;
        // The PUBLISHes just sent are being stored now.
        tokio::time::sleep(Duration::from_micros(round * 300)).await;
        gw.sigkill();
        resent += c.unrec.len();
        gw = GatewayProcess::start(dir.path(), addr);
        c.resume(addr).await;
    }
    c.run(TOTAL, 64, |_| false).await;
    drop(gw);
    let mut stored: Vec<u32> =
        log_payloads(dir.path(), "exactly").await.iter().filter_map(|p| p.parse().ok()).collect();
    stored.sort_unstable();
    let dups: Vec<u32> = stored.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
    assert!(dups.is_empty(), "stored twice ({resent} re-sent after the kills): {dups:?}");
    assert_eq!(stored, (0..TOTAL).collect::<Vec<_>>(), "every message stored once");
}
