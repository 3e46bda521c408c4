//! `lmq-bench`: MQTT load generator for lmq-gateway (and any other MQTT broker).
//!
//! Speaks MQTT 3.1.1 (or 5.0 with `--mqtt5`) over plain TCP with the crate's own codec, one
//! tokio task per connection, batched writes and reused buffers. Every published payload
//! starts with a 16-byte header — send timestamp (ns since the start of this process,
//! big-endian u64), publisher index (u32) and sequence number (u32) — so subscribers in the
//! same process compute end-to-end latency and detect loss, duplicates and reordering
//! exactly.
//!
//! Scenarios:
//! - `fan-in`: N publishers → 1 subscriber on a wildcard filter,
//! - `fan-out`: 1 publisher → N subscribers,
//! - `p2p`: N publisher/subscriber pairs on distinct topics,
//! - `idle`: N idle connections; server RSS per connection (needs `--server-pid`),
//! - `connect-storm`: N connections as fast as possible; connects/s and CONNACK latency,
//! - `kafka-raw`: the baseline of the Kafka core service — a raw librdkafka producer sending
//!   the records the gateway writes for a QoS 1 fan-in, with the gateway's producer settings,
//! - `mock-kafka`: librdkafka's mock cluster as a broker for the gateway, until killed.
//! - `state-fill`: persistent sessions and retained messages written straight into the
//!   gateway's Kafka state topics (a fleet's state, for start-up and memory measurements),
//! - `reconnect`: K of those sessions reconnect (clean session 0); CONNECT → CONNACK latency
//!   and how many found their session,
//! - `state-offsets`: the end offsets of the gateway's Kafka state topics (records written).
//!
//! With `--delay-secs`, the message scenarios publish delayed messages
//! (`$delayed/<seconds>/<topic>`, SPEC §9) and subscribe to the plain topics; subscribers then
//! also measure **lateness**: receive time − (send time + the publisher's delay), and count
//! messages that arrived early.
//!
//! Only loopback targets are accepted: this is a benchmark tool, not a traffic generator.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use lmq_gateway::protocol::{
    decode, encode, Connect, ConnectProperties, Disconnect, Packet, PacketId, Protocol, PubResponse, Publish,
    PublishProperties, QoS, Subscribe, SubscribeProperties, SubscriptionOptions,
};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout, Instant};

mod kafka;
mod state;

/// Bytes at the start of every payload: timestamp, publisher index, sequence number.
const HEADER_LEN: usize = 16;
/// Largest packet accepted from the server.
const MAX_PACKET: usize = 1 << 20;
/// A publisher stops encoding new messages while this many bytes wait to be written.
const WBUF_HIGH: usize = 64 * 1024;
/// At most this many messages are encoded per publisher loop iteration.
const BATCH_MAX: usize = 512;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Free space kept in a hot loop's read buffer before each read.
const MIN_SPARE: usize = 4096;
/// Time allowed for TCP connect + CONNACK, and for SUBACK.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Subscribers finish early once nothing arrived for this long after publishers finished.
const QUIET: Duration = Duration::from_secs(2);
/// Pause between the last SUBACK and the start, so subscriptions are live everywhere.
const SETTLE: Duration = Duration::from_millis(500);
/// Histogram range in microseconds (1 µs .. 10 min, 3 significant digits).
const HIST_MAX_US: u64 = 600_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    FanIn,
    FanOut,
    P2p,
    Idle,
    ConnectStorm,
    KafkaRaw,
    MockKafka,
    StateFill,
    Reconnect,
    StateOffsets,
}

/// The key `--sign` connects with (set once at start).
static SIGN: OnceLock<Option<SignKey>> = OnceLock::new();

struct SignKey {
    id: String,
    secret: String,
    instance: String,
}

impl SignKey {
    fn parse(spec: &str) -> Result<SignKey> {
        let mut parts = spec.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(secret), instance) if !id.is_empty() && !secret.is_empty() => {
                Ok(SignKey { id: id.into(), secret: secret.into(), instance: instance.unwrap_or("bench").into() })
            }
            _ => bail!("--sign wants ACCESS_KEY_ID:SECRET[:INSTANCE_ID]"),
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "lmq-bench", about = "MQTT load generator and benchmark (loopback only)")]
struct Args {
    /// What to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Server address; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Publishing time (fan-in/fan-out/p2p) or hold time (idle), in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Longest wait after `--duration` for outstanding acknowledgements and deliveries, in seconds.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Payload size in bytes (at least 16: timestamp, publisher, sequence).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// QoS of publications and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Publishers (fan-in), subscribers (fan-out), pairs (p2p) or connections (idle, connect-storm).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Total publish rate in messages/s over all publishers; unlimited when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// QoS 1/2 messages a publisher may have unacknowledged.
    #[arg(long, default_value_t = 64)]
    inflight: u16,
    /// Connections opened in parallel (idle, connect-storm, reconnect, and the setup of other
    /// scenarios); default 50 for reconnect, 256 otherwise.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Keepalive in seconds; connections send PINGREQ every half of it when otherwise silent.
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Use MQTT 5.0 instead of 3.1.1.
    #[arg(long)]
    mqtt5: bool,
    /// Connect with LMQ signature authentication: `ACCESS_KEY_ID:SECRET[:INSTANCE_ID]`
    /// (user name `Signature|<id>|<instance>`, password the HMAC-SHA1 of the ClientId);
    /// anonymous when absent.
    #[arg(long, value_name = "ID:SECRET[:INSTANCE]")]
    sign: Option<String>,
    /// Server process to sample (/proc/<pid>): CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// First topic level (the gateway's "parent topic").
    #[arg(long, default_value = "bench")]
    topic_prefix: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// fan-in: publishers only, no subscriber (ingest throughput).
    #[arg(long)]
    no_subscriber: bool,
    /// Publish delayed messages: to `$delayed/<seconds>/<topic>`, subscribers on `<topic>`.
    /// `N` for every publisher, or `A-B`: publisher i waits A + (i mod (B−A+1)) seconds.
    #[arg(long, value_parser = parse_delays)]
    delay_secs: Option<Delays>,
    /// Stop publishing after this many messages in all (each publisher its share), or at
    /// `--duration`, whichever comes first; rates are then per second of publishing.
    #[arg(long)]
    count: Option<u64>,
    /// kafka-raw, state-fill, state-offsets: `bootstrap.servers` (loopback addresses only).
    #[arg(long, alias = "brokers", default_value = "localhost:9092")]
    bootstrap: String,
    /// kafka-raw, mock-kafka: partitions of the topic created for `--topic-prefix` (the gateway's
    /// parent topic `*` creates 4); state-fill: of a state topic it has to create (the
    /// gateway's `core.kafka.partitions`, 4).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// fan-in, fan-out, p2p: subscribers connect with clean session 0 (persistent sessions).
    #[arg(long)]
    persistent: bool,
    #[command(flatten)]
    state: state::StateArgs,
    /// kafka-raw: producer `linger.ms` (the gateway's `core.kafka.linger_ms`).
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
}

/// `--delay-secs`: the delays of the publishers, in seconds (`min ..= max`, one per publisher
/// index in turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delays {
    min: u32,
    max: u32,
}

impl Delays {
    /// Delay of publisher `index`, in seconds.
    fn of(&self, index: usize) -> u32 {
        let span = (self.max - self.min) as usize + 1;
        self.min + (index % span) as u32
    }

    /// The topic publisher `index` publishes to for messages meant for `topic`.
    fn topic(&self, index: usize, topic: &str) -> String {
        format!("$delayed/{}/{topic}", self.of(index))
    }
}

fn parse_delays(s: &str) -> std::result::Result<Delays, String> {
    let num = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("{v:?} is not a number of seconds"));
    let (min, max) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if min == 0 || min > max {
        return Err("delays are N or A-B with 0 < A <= B".into());
    }
    Ok(Delays { min, max })
}

impl Args {
    fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or(if self.scenario == Scenario::Reconnect { 50 } else { 256 })
    }

    fn protocol(&self) -> Protocol {
        if self.mqtt5 {
            Protocol::V5
        } else {
            Protocol::V311
        }
    }

    fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtMostOnce)
    }

    fn validate(&self) -> Result<SocketAddr> {
        let ip: IpAddr = if self.host == "localhost" {
            IpAddr::from([127, 0, 0, 1])
        } else {
            self.host.parse().with_context(|| format!("--host {:?} is not an IP address", self.host))?
        };
        if !ip.is_loopback() {
            bail!("--host {ip} is not a loopback address; lmq-bench only targets the local machine");
        }
        if self.payload < HEADER_LEN {
            bail!("--payload must be at least {HEADER_LEN} bytes");
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if !(self.duration > 0.0 && self.duration.is_finite() && self.drain >= 0.0 && self.drain.is_finite()) {
            bail!("--duration must be > 0 and --drain >= 0");
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be > 0");
            }
        }
        if self.inflight == 0 || self.concurrency() == 0 {
            bail!("--inflight and --concurrency must be at least 1");
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#', '/']) {
            bail!("--topic-prefix must be one non-empty topic level without wildcards");
        }
        if self.count == Some(0) {
            bail!("--count must be at least 1");
        }
        if matches!(self.scenario, Scenario::StateFill | Scenario::Reconnect | Scenario::StateOffsets) {
            self.state.validate(self.scenario == Scenario::Reconnect, self.clients)?;
            kafka::check_bootstrap(&self.bootstrap)?;
        }
        if matches!(self.scenario, Scenario::KafkaRaw | Scenario::MockKafka) {
            if self.delay_secs.is_some() || self.count.is_some() {
                bail!("--delay-secs and --count are for the MQTT message scenarios");
            }
            kafka::check_bootstrap(&self.bootstrap)?;
            if self.rate.is_some() {
                bail!("{:?} sends at full speed: --rate does not apply", self.scenario);
            }
        }
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Monotonic nanoseconds since the first call (shared by publishers and subscribers).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn new_histogram() -> Histogram<u64> {
    // Bounds are constants known to be valid.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

// ---------------------------------------------------------------------------------------
// Connection plumbing
// ---------------------------------------------------------------------------------------

/// One MQTT connection: socket plus reused read and write buffers.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Protocol,
    /// Server's Receive Maximum (MQTT 5), else `u16::MAX`.
    server_receive_max: u16,
    /// The CONNACK's session present flag.
    session_present: bool,
}

impl Conn {
    /// TCP connect, CONNECT, wait for a successful CONNACK; also the time from writing the
    /// CONNECT to reading the CONNACK.
    async fn open_timed(
        addr: SocketAddr,
        protocol: Protocol,
        client_id: String,
        keepalive: u16,
        clean_start: bool,
    ) -> Result<(Conn, Duration)> {
        let stream = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(256),
            wbuf: BytesMut::with_capacity(256),
            protocol,
            server_receive_max: u16::MAX,
            session_present: false,
        };
        let (username, password) = match SIGN.get().and_then(Option::as_ref) {
            Some(key) => (
                Some(format!("Signature|{}|{}", key.id, key.instance)),
                Some(bytes::Bytes::from(lmq_gateway::auth::signature::sign(&key.secret, &client_id))),
            ),
            None => (None, None),
        };
        let connect = Connect {
            protocol,
            clean_start,
            keep_alive: keepalive,
            client_id,
            will: None,
            username,
            password,
            properties: ConnectProperties::default(),
        };
        conn.queue(&Packet::Connect(Box::new(connect)))?;
        let sent = Instant::now();
        conn.flush().await?;
        match timeout(HANDSHAKE_TIMEOUT, conn.read_packet()).await.map_err(|_| anyhow!("no CONNACK in time"))?? {
            Packet::ConnAck(ack) if !ack.code.is_error() => {
                let took = sent.elapsed();
                if let Some(max) = ack.properties.receive_maximum {
                    conn.server_receive_max = max;
                }
                conn.session_present = ack.session_present;
                Ok((conn, took))
            }
            Packet::ConnAck(ack) => bail!("CONNACK refused the connection: reason code {:#04x}", ack.code.0),
            other => bail!("expected CONNACK, got {}", other.name()),
        }
    }

    /// SUBSCRIBE to one filter and wait for a successful SUBACK.
    async fn subscribe(&mut self, filter: String, qos: QoS) -> Result<()> {
        let sub = Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![(filter.clone(), SubscriptionOptions { qos, ..Default::default() })],
            properties: SubscribeProperties::default(),
        };
        self.queue(&Packet::Subscribe(sub))?;
        self.flush().await?;
        match timeout(HANDSHAKE_TIMEOUT, self.read_packet()).await.map_err(|_| anyhow!("no SUBACK in time"))?? {
            Packet::SubAck(ack) => match ack.codes.first() {
                Some(code) if !code.is_error() => Ok(()),
                Some(code) => bail!("SUBACK refused {filter:?}: reason code {:#04x}", code.0),
                None => bail!("SUBACK without reason codes"),
            },
            other => bail!("expected SUBACK, got {}", other.name()),
        }
    }

    fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode(packet, self.protocol, &mut self.wbuf).map_err(|e| anyhow!("encoding {}: {e}", packet.name()))
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.wbuf).await.context("writing to the server")?;
        self.wbuf.clear();
        Ok(())
    }

    /// Next packet from the socket (used outside the hot loops).
    async fn read_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    fn try_decode(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.rbuf, self.protocol, MAX_PACKET).map_err(|e| anyhow!("malformed packet from the server: {e}"))
    }

    async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 128 {
            self.rbuf.reserve(256.max(self.rbuf.len()));
        }
        let n = self.stream.read_buf(&mut self.rbuf).await.context("reading from the server")?;
        if n == 0 {
            bail!("server closed the connection");
        }
        Ok(())
    }

    /// Polite close: DISCONNECT, then wait (bounded) for the server to close first, so the
    /// TIME_WAIT state stays on the server side and client ports are not exhausted.
    async fn close(mut self) {
        let disconnect = Packet::Disconnect(Disconnect::default());
        if self.queue(&disconnect).is_err() || self.flush().await.is_err() {
            return;
        }
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut scratch = [0u8; 512];
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
            if n == 0 {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Message scenarios (fan-in, fan-out, p2p)
// ---------------------------------------------------------------------------------------

/// Run-wide coordination between main, publishers and subscribers.
struct Run {
    /// Per publisher: messages the subscribers should receive (QoS 0: written; QoS 1/2: acknowledged).
    published: Vec<AtomicU64>,
    pubs_done: AtomicUsize,
    /// Nanoseconds (`now_ns`) when the last publisher sent its last message (`--count`).
    last_sent_ns: AtomicU64,
    /// Set once, when everyone is connected: (start, end of publishing, hard deadline).
    clock: watch::Sender<Option<Clock>>,
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    stop: Instant,
    deadline: Instant,
}

async fn wait_clock(rx: &mut watch::Receiver<Option<Clock>>) -> Result<Clock> {
    let clock = rx.wait_for(Option::is_some).await.map_err(|_| anyhow!("run aborted before start"))?;
    clock.ok_or_else(|| anyhow!("run clock missing"))
}

struct PubResult {
    sent: u64,
    acked: u64,
    /// Acknowledgements received before publishing stopped.
    acked_in_window: u64,
    unacked: u64,
    /// Publish (encoded into the write buffer) → PUBACK / PUBCOMP, µs.
    ack_hist: Histogram<u64>,
}

impl PubResult {
    fn new() -> PubResult {
        PubResult { sent: 0, acked: 0, acked_in_window: 0, unacked: 0, ack_hist: new_histogram() }
    }

    /// Count one acknowledgement of a message published at `sent_ns`.
    fn ack(&mut self, sent_ns: u64, publishing: bool) {
        self.acked += 1;
        if publishing {
            self.acked_in_window += 1;
        }
        self.ack_hist.saturating_record((now_ns().saturating_sub(sent_ns) / 1000).max(1));
    }

    fn add(&mut self, other: &PubResult) -> Result<()> {
        self.sent += other.sent;
        self.acked += other.acked;
        self.acked_in_window += other.acked_in_window;
        self.unacked += other.unacked;
        self.ack_hist.add(&other.ack_hist).map_err(|e| anyhow!("merging histograms: {e:?}"))
    }
}

/// Per-subscriber view of one publisher's sequence numbers.
#[derive(Default)]
struct SeqTracker {
    seen: Vec<u64>,
    last: Option<u32>,
}

impl SeqTracker {
    /// Records `seq`; returns (is_new, out_of_order).
    fn record(&mut self, seq: u32) -> (bool, bool) {
        let (word, bit) = (seq as usize / 64, seq % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        let new = self.seen[word] & (1 << bit) == 0;
        self.seen[word] |= 1 << bit;
        let out_of_order = new && self.last.is_some_and(|l| seq < l);
        if self.last.is_none_or(|l| seq > l) {
            self.last = Some(seq);
        }
        (new, out_of_order)
    }
}

struct SubResult {
    /// Receive time − (send time + delay) of delayed messages, µs (`--delay-secs`).
    lateness: Histogram<u64>,
    /// Delayed messages received before send time + delay.
    early: u64,
    /// The most one of them was early, µs.
    early_max_us: u64,
    received: u64,
    in_window: u64,
    unique: u64,
    duplicates: u64,
    out_of_order: u64,
    expected: u64,
    hist: Histogram<u64>,
}

struct PubSpec {
    index: u32,
    topic: String,
}

struct SubSpec {
    filter: String,
    /// Publisher indices whose messages this subscriber should receive.
    sources: Vec<usize>,
}

/// Packet identifiers in flight, allocated round-robin.
struct IdPool {
    used: Vec<bool>,
    next: u16,
    count: usize,
}

impl IdPool {
    fn new() -> Self {
        IdPool { used: vec![false; 65536], next: 1, count: 0 }
    }

    fn alloc(&mut self) -> Option<PacketId> {
        if self.count >= 65535 {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if self.next == u16::MAX { 1 } else { self.next + 1 };
            if !self.used[usize::from(id)] {
                self.used[usize::from(id)] = true;
                self.count += 1;
                return PacketId::new(id);
            }
        }
    }

    fn release(&mut self, id: PacketId) -> bool {
        let slot = &mut self.used[usize::from(id.get())];
        let was = *slot;
        *slot = false;
        if was {
            self.count -= 1;
        }
        was
    }
}

#[derive(Clone)]
struct PubConfig {
    /// Messages this publisher sends at most (`--count`).
    limit: Option<u64>,
    qos: QoS,
    payload: usize,
    window: usize,
    /// Messages/s for this publisher, if paced.
    rate: Option<f64>,
    keepalive: Duration,
}

async fn publisher(mut conn: Conn, spec: PubSpec, cfg: Arc<PubConfig>, run: Arc<Run>) -> Result<PubResult> {
    let mut clock_rx = run.clock.subscribe();
    let result = publish_loop(&mut conn, &spec, &cfg, &run, &mut clock_rx).await;
    run.pubs_done.fetch_add(1, Ordering::SeqCst);
    let result = result?;
    conn.close().await;
    Ok(result)
}

async fn publish_loop(
    conn: &mut Conn,
    spec: &PubSpec,
    cfg: &PubConfig,
    run: &Run,
    clock_rx: &mut watch::Receiver<Option<Clock>>,
) -> Result<PubResult> {
    let clock = wait_clock(clock_rx).await?;
    let counter = &run.published[spec.index as usize];
    let window =
        if cfg.qos == QoS::AtMostOnce { usize::MAX } else { cfg.window.min(usize::from(conn.server_receive_max)) };
    let mut packet = Packet::Publish(Publish {
        dup: false,
        qos: cfg.qos,
        retain: false,
        topic: spec.topic.clone(),
        packet_id: None,
        payload: vec![0u8; cfg.payload].into(),
        properties: PublishProperties::default(),
    });
    let mut ids = IdPool::new();
    // Send time of each packet identifier in flight.
    let mut sent_at = vec![0u64; 65536];
    let mut res = PubResult::new();
    let mut seq: u32 = 0;
    let mut last_write = Instant::now();
    let Conn { stream, rbuf, wbuf, protocol, .. } = conn;
    let protocol = *protocol;
    let (mut rd, mut wr) = stream.split();
    let timer = sleep_until(clock.deadline);
    tokio::pin!(timer);

    loop {
        let now = Instant::now();
        let publishing = now < clock.stop && cfg.limit.is_none_or(|l| res.sent < l);
        if !publishing && ids.count == 0 && wbuf.is_empty() {
            break;
        }
        if now >= clock.deadline {
            res.unacked = ids.count as u64;
            break;
        }

        // Encode the next batch.
        let mut next_due: Option<Instant> = None;
        if publishing && wbuf.len() < WBUF_HIGH {
            let mut budget = window.saturating_sub(ids.count).min(BATCH_MAX);
            if let Some(limit) = cfg.limit {
                budget = budget.min(usize::try_from(limit - res.sent).unwrap_or(usize::MAX));
            }
            if let Some(rate) = cfg.rate {
                let elapsed = now.saturating_duration_since(clock.start).as_secs_f64();
                let allowed = (rate * elapsed) as u64 + 1;
                let due = allowed.saturating_sub(res.sent);
                budget = budget.min(usize::try_from(due).unwrap_or(usize::MAX));
                // The next message falls due at (sent+1)/rate after the start.
                let next = clock.start + Duration::from_secs_f64((res.sent + budget as u64) as f64 / rate);
                next_due = Some(next.max(now + Duration::from_micros(100)));
            }
            for _ in 0..budget {
                let Packet::Publish(p) = &mut packet else { unreachable!("packet is a PUBLISH") };
                let t_ns = now_ns();
                if cfg.qos != QoS::AtMostOnce {
                    let id = ids.alloc().ok_or_else(|| anyhow!("packet identifiers exhausted"))?;
                    sent_at[usize::from(id.get())] = t_ns;
                    p.packet_id = Some(id);
                }
                encode(&packet, protocol, wbuf).map_err(|e| anyhow!("encoding PUBLISH: {e}"))?;
                // The payload is the tail of the packet just encoded: stamp its header.
                let at = wbuf.len() - cfg.payload;
                wbuf[at..at + 8].copy_from_slice(&t_ns.to_be_bytes());
                wbuf[at + 8..at + 12].copy_from_slice(&spec.index.to_be_bytes());
                wbuf[at + 12..at + 16].copy_from_slice(&seq.to_be_bytes());
                seq = seq.wrapping_add(1);
                res.sent += 1;
                if cfg.limit == Some(res.sent) {
                    run.last_sent_ns.fetch_max(t_ns, Ordering::Relaxed);
                }
                if cfg.qos == QoS::AtMostOnce {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if wbuf.is_empty() && now.duration_since(last_write) >= cfg.keepalive / 2 {
            encode(&Packet::PingReq, protocol, wbuf).map_err(|e| anyhow!("encoding PINGREQ: {e}"))?;
        }

        // Wake-up when idle: the next paced message, the end of publishing, or the deadline.
        let wake = if publishing {
            next_due.unwrap_or(if ids.count >= window { clock.stop } else { now + Duration::from_millis(1) })
        } else {
            clock.deadline
        };
        let wake = wake.min(clock.deadline).min(last_write + cfg.keepalive / 2);
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }

        if rbuf.capacity() - rbuf.len() < MIN_SPARE {
            rbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            r = rd.read_buf(rbuf) => {
                let n = r.context("reading from the server")?;
                if n == 0 {
                    bail!("server closed the connection");
                }
                while let Some(pkt) = decode(rbuf, protocol, MAX_PACKET).map_err(|e| anyhow!("malformed packet from the server: {e}"))? {
                    match pkt {
                        Packet::PubAck(ack) if cfg.qos == QoS::AtLeastOnce => {
                            if ids.release(ack.packet_id) {
                                if ack.code.is_error() {
                                    bail!("PUBACK with error reason code {:#04x}", ack.code.0);
                                }
                                res.ack(sent_at[usize::from(ack.packet_id.get())], Instant::now() < clock.stop);
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Packet::PubRec(rec) if cfg.qos == QoS::ExactlyOnce => {
                            if rec.code.is_error() {
                                bail!("PUBREC with error reason code {:#04x}", rec.code.0);
                            }
                            encode(&Packet::PubRel(PubResponse::new(rec.packet_id)), protocol, wbuf)
                                .map_err(|e| anyhow!("encoding PUBREL: {e}"))?;
                        }
                        Packet::PubComp(comp) if cfg.qos == QoS::ExactlyOnce => {
                            if ids.release(comp.packet_id) {
                                res.ack(sent_at[usize::from(comp.packet_id.get())], Instant::now() < clock.stop);
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Packet::PingResp => {}
                        Packet::Disconnect(d) => bail!("server sent DISCONNECT (reason code {:#04x})", d.code.0),
                        other => bail!("unexpected {} from the server", other.name()),
                    }
                }
            }
            w = wr.write(wbuf), if !wbuf.is_empty() => {
                let n = w.context("writing to the server")?;
                wbuf.advance(n);
                last_write = Instant::now();
            }
            _ = &mut timer, if wbuf.is_empty() => {}
        }
    }
    Ok(res)
}

async fn subscriber(
    mut conn: Conn,
    spec: SubSpec,
    n_pubs: usize,
    keepalive: Duration,
    delays: Option<Delays>,
    run: Arc<Run>,
) -> Result<SubResult> {
    let mut clock_rx = run.clock.subscribe();
    let clock = wait_clock(&mut clock_rx).await?;
    let mut trackers: Vec<SeqTracker> = (0..n_pubs).map(|_| SeqTracker::default()).collect();
    // Delayed messages still arrive up to the longest delay after the last was published.
    let quiet = QUIET + Duration::from_secs(delays.map_or(0, |d| u64::from(d.max)));
    let mut res = SubResult {
        lateness: new_histogram(),
        early: 0,
        early_max_us: 0,
        received: 0,
        in_window: 0,
        unique: 0,
        duplicates: 0,
        out_of_order: 0,
        expected: 0,
        hist: new_histogram(),
    };
    let mut last_rx = Instant::now();
    let mut last_write = Instant::now();
    // One timer for the whole loop: re-arming a fresh sleep per read would cost a timer-wheel
    // insertion per packet when the server writes one message per segment.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let Conn { stream, rbuf, wbuf, protocol, .. } = &mut conn;
    let protocol = *protocol;
    let (mut rd, mut wr) = stream.split();

    loop {
        let now = Instant::now();
        if now >= clock.deadline {
            break;
        }
        if run.pubs_done.load(Ordering::SeqCst) == n_pubs {
            let expected: u64 = spec.sources.iter().map(|&i| run.published[i].load(Ordering::SeqCst)).sum();
            res.expected = expected;
            if res.unique >= expected || now.duration_since(last_rx) >= quiet {
                break;
            }
        }
        if wbuf.is_empty() && now.duration_since(last_write) >= keepalive / 2 {
            encode(&Packet::PingReq, protocol, wbuf).map_err(|e| anyhow!("encoding PINGREQ: {e}"))?;
        }
        if rbuf.capacity() - rbuf.len() < MIN_SPARE {
            rbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            r = rd.read_buf(rbuf) => {
                let n = r.context("reading from the server")?;
                if n == 0 {
                    bail!("server closed the connection");
                }
                let at = Instant::now();
                let t_ns = now_ns();
                last_rx = at;
                while let Some(pkt) = decode(rbuf, protocol, MAX_PACKET).map_err(|e| anyhow!("malformed packet from the server: {e}"))? {
                    match pkt {
                        Packet::Publish(p) => {
                            if let Some(id) = p.packet_id {
                                let ack = PubResponse::new(id);
                                let reply = if p.qos == QoS::ExactlyOnce { Packet::PubRec(ack) } else { Packet::PubAck(ack) };
                                encode(&reply, protocol, wbuf).map_err(|e| anyhow!("encoding acknowledgement: {e}"))?;
                            }
                            res.received += 1;
                            if at < clock.stop {
                                res.in_window += 1;
                            }
                            let Some(header) = p.payload.get(..HEADER_LEN) else {
                                bail!("PUBLISH on {:?} with a {}-byte payload: not from lmq-bench", p.topic, p.payload.len());
                            };
                            let mut h = header;
                            let sent_ns = h.get_u64();
                            let publisher = h.get_u32() as usize;
                            let seq = h.get_u32();
                            let tracker = trackers.get_mut(publisher).ok_or_else(|| anyhow!("PUBLISH from unknown publisher {publisher}"))?;
                            let (new, ooo) = tracker.record(seq);
                            if new {
                                res.unique += 1;
                                res.hist.saturating_record((t_ns.saturating_sub(sent_ns) / 1000).max(1));
                                if let Some(d) = delays {
                                    let due_ns = sent_ns + u64::from(d.of(publisher)) * 1_000_000_000;
                                    match t_ns.checked_sub(due_ns) {
                                        Some(late) => res.lateness.saturating_record((late / 1000).max(1)),
                                        None => {
                                            res.early += 1;
                                            res.early_max_us = res.early_max_us.max((due_ns - t_ns) / 1000);
                                        }
                                    }
                                }
                            } else {
                                res.duplicates += 1;
                            }
                            if ooo {
                                res.out_of_order += 1;
                            }
                        }
                        Packet::PubRel(rel) => {
                            encode(&Packet::PubComp(PubResponse::new(rel.packet_id)), protocol, wbuf)
                                .map_err(|e| anyhow!("encoding PUBCOMP: {e}"))?;
                        }
                        Packet::PingResp => {}
                        Packet::Disconnect(d) => bail!("server sent DISCONNECT (reason code {:#04x})", d.code.0),
                        other => bail!("unexpected {} from the server", other.name()),
                    }
                }
            }
            w = wr.write(wbuf), if !wbuf.is_empty() => {
                let n = w.context("writing to the server")?;
                wbuf.advance(n);
                last_write = Instant::now();
            }
            _ = tick.tick() => {}
        }
    }
    if !wbuf.is_empty() {
        // Acknowledgements still owed; best effort.
        let _ = timeout(Duration::from_secs(1), wr.write_all(wbuf)).await;
        wbuf.clear();
    }
    conn.close().await;
    Ok(res)
}

/// Opens `n` connections with at most `concurrency` handshakes at a time.
async fn open_many(
    addr: SocketAddr,
    protocol: Protocol,
    ids: Vec<String>,
    keepalive: u16,
    concurrency: usize,
    clean_start: bool,
) -> Vec<Result<(Conn, Duration)>> {
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(ids.len());
    for id in ids {
        let sem = Arc::clone(&sem);
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.map_err(|_| anyhow!("semaphore closed"))?;
            let t0 = Instant::now();
            let (conn, _) = Conn::open_timed(addr, protocol, id, keepalive, clean_start).await?;
            Ok((conn, t0.elapsed()))
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(anyhow!("connection task failed: {e}"))));
    }
    out
}

fn run_tag() -> String {
    format!("{:06x}", (std::process::id() ^ (now_ns() as u32).rotate_left(13)) & 0xFF_FFFF)
}

async fn message_scenario(args: &Args, addr: SocketAddr, report: &mut Report) -> Result<()> {
    let protocol = args.protocol();
    let qos = args.qos();
    let tag = run_tag();
    let base = format!("{}/{tag}", args.topic_prefix);
    let n = args.clients;
    let publish_topic = |i: usize, topic: String| match &args.delay_secs {
        Some(d) => d.topic(i, &topic),
        None => topic,
    };
    let (pubs, subs): (Vec<PubSpec>, Vec<SubSpec>) = match args.scenario {
        Scenario::FanIn => (
            (0..n).map(|i| PubSpec { index: i as u32, topic: publish_topic(i, format!("{base}/in/{i}")) }).collect(),
            if args.no_subscriber {
                Vec::new()
            } else {
                vec![SubSpec { filter: format!("{base}/in/+"), sources: (0..n).collect() }]
            },
        ),
        Scenario::FanOut => (
            vec![PubSpec { index: 0, topic: publish_topic(0, format!("{base}/out")) }],
            (0..n).map(|_| SubSpec { filter: format!("{base}/out"), sources: vec![0] }).collect(),
        ),
        Scenario::P2p => (
            (0..n).map(|i| PubSpec { index: i as u32, topic: publish_topic(i, format!("{base}/p2p/{i}")) }).collect(),
            (0..n).map(|i| SubSpec { filter: format!("{base}/p2p/{i}"), sources: vec![i] }).collect(),
        ),
        Scenario::Idle
        | Scenario::ConnectStorm
        | Scenario::KafkaRaw
        | Scenario::MockKafka
        | Scenario::StateFill
        | Scenario::Reconnect
        | Scenario::StateOffsets => {
            unreachable!("not an MQTT message scenario")
        }
    };
    let n_pubs = pubs.len();
    report.publishers = Some(n_pubs);
    report.subscribers = Some(subs.len());
    let (clock_tx, _) = watch::channel(None);
    let run = Arc::new(Run {
        published: (0..n_pubs).map(|_| AtomicU64::new(0)).collect(),
        pubs_done: AtomicUsize::new(0),
        last_sent_ns: AtomicU64::new(0),
        clock: clock_tx,
    });
    let keepalive = Duration::from_secs(u64::from(args.keepalive.max(1)));

    // Subscribers first: connect, subscribe.
    let sub_ids = (0..subs.len()).map(|i| format!("lb-{tag}-s{i}")).collect();
    let mut sub_conns = Vec::new();
    for r in open_many(addr, protocol, sub_ids, args.keepalive, args.concurrency(), !args.persistent).await {
        sub_conns.push(r.context("opening a subscriber connection")?.0);
    }
    let sem = Arc::new(Semaphore::new(args.concurrency()));
    let delays = args.delay_secs;
    let mut sub_tasks = Vec::new();
    let mut ready = Vec::new();
    for (mut conn, spec) in sub_conns.into_iter().zip(subs) {
        let sem = Arc::clone(&sem);
        let run = Arc::clone(&run);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        ready.push(ready_rx);
        sub_tasks.push(tokio::spawn(async move {
            let sub = {
                let _permit = sem.acquire().await.map_err(|_| anyhow!("semaphore closed"))?;
                conn.subscribe(spec.filter.clone(), qos).await
            };
            if let Err(e) = sub {
                let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                return Err(e);
            }
            let _ = ready_tx.send(Ok(()));
            subscriber(conn, spec, n_pubs, keepalive, delays, run).await
        }));
    }
    for r in ready {
        r.await.map_err(|_| anyhow!("subscriber task ended before subscribing"))?.context("subscribing")?;
    }

    // Then publishers.
    let pub_ids = (0..n_pubs).map(|i| format!("lb-{tag}-p{i}")).collect();
    // `--count`: each publisher its share, the first ones one more for the remainder.
    let limit = |i: usize| args.count.map(|c| c / n_pubs as u64 + u64::from((i as u64) < c % n_pubs as u64));
    let cfg = Arc::new(PubConfig {
        limit: None,
        qos,
        payload: args.payload,
        window: usize::from(args.inflight),
        rate: args.rate.map(|r| r / n_pubs as f64),
        keepalive,
    });
    let mut pub_tasks = Vec::new();
    for (r, spec) in
        open_many(addr, protocol, pub_ids, args.keepalive, args.concurrency(), true).await.into_iter().zip(pubs)
    {
        let (conn, _) = r.context("opening a publisher connection")?;
        let cfg = Arc::new(PubConfig { limit: limit(spec.index as usize), ..PubConfig::clone(&cfg) });
        pub_tasks.push(tokio::spawn(publisher(conn, spec, cfg, Arc::clone(&run))));
    }
    tokio::time::sleep(SETTLE).await;

    let server_before = args.server_pid.map(ProcSample::read).transpose()?;
    let client_before = self_cpu_secs();
    let start = Instant::now();
    let start_ns = now_ns();
    let stop = start + Duration::from_secs_f64(args.duration);
    let deadline = stop + Duration::from_secs_f64(args.drain);
    run.clock.send_replace(Some(Clock { start, stop, deadline }));
    // Scripts measuring the server over the publishing window wait for this line.
    eprintln!("lmq-bench: publishing starts ({} subscribers ready)", report.subscribers.unwrap_or(0));

    // Sample the server when publishing stops (not during the drain): at `--duration`, or
    // once every publisher has finished (`--count`).
    let sampler = args.server_pid.map(|pid| {
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            let finished = async {
                while run.pubs_done.load(Ordering::SeqCst) < n_pubs {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                _ = sleep_until(stop) => {}
                _ = finished => {}
            }
            ProcSample::read(pid)
        })
    });

    let mut pub_total = PubResult::new();
    for t in pub_tasks {
        match t.await {
            Ok(Ok(r)) => pub_total.add(&r)?,
            Ok(Err(e)) => report.error(format!("publisher: {e:#}")),
            Err(e) => report.error(format!("publisher task: {e}")),
        }
    }
    let mut hist = new_histogram();
    let mut lateness = new_histogram();
    let (mut received, mut in_window, mut unique, mut dups, mut ooo, mut expected, mut early) = (0, 0, 0, 0, 0, 0, 0);
    let mut early_max_us = 0;
    for t in sub_tasks {
        match t.await {
            Ok(Ok(r)) => {
                received += r.received;
                in_window += r.in_window;
                unique += r.unique;
                dups += r.duplicates;
                ooo += r.out_of_order;
                expected += r.expected;
                early += r.early;
                early_max_us = early_max_us.max(r.early_max_us);
                hist.add(&r.hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
                lateness.add(&r.lateness).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
            }
            Ok(Err(e)) => report.error(format!("subscriber: {e:#}")),
            Err(e) => report.error(format!("subscriber task: {e}")),
        }
    }
    // With `--count` met before `--duration`, rates are per second of publishing.
    let last_sent = run.last_sent_ns.load(Ordering::Relaxed);
    let secs = if args.count.is_some() && last_sent > start_ns && pub_total.sent >= args.count.unwrap_or(0) {
        (last_sent - start_ns) as f64 / 1e9
    } else {
        args.duration
    };
    report.publish_s = Some(secs);
    report.client_cpu_s = Some(self_cpu_secs() - client_before);
    if let (Some(before), Some(sampler)) = (server_before, sampler) {
        let after = sampler.await.map_err(|e| anyhow!("sampler task: {e}"))??;
        report.server = Some(ServerStats::between(&before, &after, secs));
    }
    report.messages = Some(MessageStats {
        sent: pub_total.sent,
        sent_per_s: pub_total.sent as f64 / secs,
        acked: (qos != QoS::AtMostOnce).then_some(pub_total.acked),
        acked_per_s: (qos != QoS::AtMostOnce).then_some(pub_total.acked_in_window as f64 / secs),
        delay_secs: args.delay_secs.map(|d| [d.min, d.max]),
        lateness_us: Latency::from_hist(&lateness),
        early: args.delay_secs.map(|_| early),
        early_max_us: args.delay_secs.map(|_| early_max_us),
        unacked: (qos != QoS::AtMostOnce).then_some(pub_total.unacked),
        ack_latency_us: Latency::from_hist(&pub_total.ack_hist),
        expected,
        received,
        received_per_s: in_window as f64 / secs,
        unique,
        duplicates: dups,
        out_of_order: ooo,
        lost: expected.saturating_sub(unique),
        latency_us: Latency::from_hist(&hist),
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Connection scenarios (idle, connect-storm)
// ---------------------------------------------------------------------------------------

async fn idle_scenario(args: &Args, addr: SocketAddr, report: &mut Report) -> Result<()> {
    let tag = run_tag();
    let settle = Duration::from_secs(2);
    let before = args.server_pid.map(ProcSample::read).transpose()?;
    let ids = (0..args.clients).map(|i| format!("lb-{tag}-i{i}")).collect();
    let t0 = Instant::now();
    let results = open_many(addr, args.protocol(), ids, args.keepalive, args.concurrency(), true).await;
    let open_secs = t0.elapsed().as_secs_f64();
    let mut conns = Vec::new();
    for r in results {
        match r {
            Ok((c, _)) => conns.push(c),
            Err(e) => report.error(format!("connect: {e:#}")),
        }
    }
    let connected = conns.len();
    let (stop_tx, stop_rx) = watch::channel(false);
    let keepalive = Duration::from_secs(u64::from(args.keepalive.max(1)));
    let holders: Vec<_> = conns.into_iter().map(|c| tokio::spawn(hold_idle(c, keepalive, stop_rx.clone()))).collect();
    tokio::time::sleep(settle).await;
    let after_open = args.server_pid.map(ProcSample::read).transpose()?;
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let after_hold = args.server_pid.map(ProcSample::read).transpose()?;
    let _ = stop_tx.send(true);
    let mut dropped = 0usize;
    for h in holders {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                dropped += 1;
                report.error(format!("idle connection: {e:#}"));
            }
            Err(e) => report.error(format!("idle task: {e}")),
        }
    }
    let per_conn = |a: &Option<ProcSample>| match (&before, a) {
        (Some(b), Some(a)) if connected > 0 => Some((a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / connected as f64),
        _ => None,
    };
    report.idle = Some(IdleStats {
        requested: args.clients,
        connected,
        dropped_during_hold: dropped,
        open_secs,
        rss_kb_before: before.as_ref().map(|s| s.rss_kb),
        rss_kb_after_open: after_open.as_ref().map(|s| s.rss_kb),
        rss_kb_after_hold: after_hold.as_ref().map(|s| s.rss_kb),
        bytes_per_conn_after_open: per_conn(&after_open),
        bytes_per_conn_after_hold: per_conn(&after_hold),
    });
    Ok(())
}

/// Keeps an idle connection alive (PINGREQ every keepalive/2) until told to stop.
async fn hold_idle(mut conn: Conn, keepalive: Duration, mut stop: watch::Receiver<bool>) -> Result<()> {
    let mut ping = tokio::time::interval_at(Instant::now() + keepalive / 2, keepalive / 2);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ping.tick() => {
                conn.queue(&Packet::PingReq)?;
                conn.flush().await?;
            }
            r = conn.fill() => {
                r?;
                while let Some(p) = conn.try_decode()? {
                    match p {
                        Packet::PingResp => {}
                        other => bail!("unexpected {} on an idle connection", other.name()),
                    }
                }
            }
        }
    }
    conn.close().await;
    Ok(())
}

async fn storm_scenario(args: &Args, addr: SocketAddr, report: &mut Report) -> Result<()> {
    let tag = run_tag();
    let before = args.server_pid.map(ProcSample::read).transpose()?;
    let client_before = self_cpu_secs();
    let ids = (0..args.clients).map(|i| format!("lb-{tag}-c{i}")).collect();
    let t0 = Instant::now();
    let results = open_many(addr, args.protocol(), ids, args.keepalive, args.concurrency(), true).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let after = args.server_pid.map(ProcSample::read).transpose()?;
    let mut hist = new_histogram();
    let mut conns = Vec::new();
    for r in results {
        match r {
            Ok((c, lat)) => {
                hist.saturating_record(u64::try_from(lat.as_micros()).unwrap_or(u64::MAX).max(1));
                conns.push(c);
            }
            Err(e) => report.error(format!("connect: {e:#}")),
        }
    }
    let connected = conns.len();
    report.client_cpu_s = Some(self_cpu_secs() - client_before);
    if let (Some(b), Some(a)) = (before, after) {
        report.server = Some(ServerStats::between(&b, &a, elapsed));
    }
    // Close in bounded parallel batches.
    let sem = Arc::new(Semaphore::new(args.concurrency()));
    let closers: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let sem = Arc::clone(&sem);
            tokio::spawn(async move {
                let _permit = sem.acquire().await;
                c.close().await;
            })
        })
        .collect();
    for c in closers {
        let _ = c.await;
    }
    report.storm = Some(StormStats {
        requested: args.clients,
        connected,
        concurrency: args.concurrency(),
        elapsed_s: elapsed,
        connects_per_s: connected as f64 / elapsed,
        connack_latency_us: Latency::from_hist(&hist),
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Process statistics
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ProcSample {
    rss_kb: u64,
    hwm_kb: u64,
    cpu_secs: f64,
}

impl ProcSample {
    fn read(pid: u32) -> Result<ProcSample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status (is --server-pid right?)"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest =
            stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            fields.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat format"))
        };
        // `rest` starts at field 3 (state), so field N is at index N - 3.
        let total_ticks = ticks(14 - 3)? + ticks(15 - 3)?;
        Ok(ProcSample {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
            cpu_secs: total_ticks as f64 / clock_ticks(),
        })
    }
}

#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time (user + system) of this process so far, in seconds.
#[allow(unsafe_code)]
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-files limit to the hard limit; returns (soft, hard) in force.
#[allow(unsafe_code)]
fn raise_nofile_limit() -> Result<(u64, u64)> {
    // SAFETY: plain libc calls on a stack struct.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            bail!("setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Latency {
    count: u64,
    mean: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latency {
    fn from_hist(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

#[derive(Debug, Serialize)]
struct MessageStats {
    /// PUBLISH packets written.
    sent: u64,
    sent_per_s: f64,
    /// QoS 1/2: PUBLISHes the server acknowledged (PUBACK / PUBCOMP).
    #[serde(skip_serializing_if = "Option::is_none")]
    acked: Option<u64>,
    /// QoS 1/2: acknowledgements received during the publishing window, per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    acked_per_s: Option<f64>,
    /// `--delay-secs`: shortest and longest delay of the publishers, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_secs: Option<[u32; 2]>,
    /// Delayed messages: receive time − (send time + delay), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    lateness_us: Option<Latency>,
    /// Delayed messages received before send time + delay (the gateway keeps due times in
    /// whole milliseconds: up to 1 ms early is its resolution).
    #[serde(skip_serializing_if = "Option::is_none")]
    early: Option<u64>,
    /// The most one of them was early, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    early_max_us: Option<u64>,
    /// QoS 1/2: still unacknowledged at the end of the drain period.
    #[serde(skip_serializing_if = "Option::is_none")]
    unacked: Option<u64>,
    /// Deliveries owed to subscribers (QoS 0: per sent message; QoS 1/2: per acknowledged one).
    expected: u64,
    received: u64,
    /// Deliveries received during the publishing window, per second.
    received_per_s: f64,
    unique: u64,
    duplicates: u64,
    /// Messages received with a lower sequence number than one already seen from the same publisher.
    out_of_order: u64,
    /// expected − unique (for QoS 0 these are drops the protocol allows).
    lost: u64,
    latency_us: Option<Latency>,
    /// QoS 1/2: publish → acknowledgement (PUBACK, PUBCOMP or Kafka delivery report), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_latency_us: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct ServerStats {
    cpu_s: f64,
    /// CPU time / wall time × 100 (200 = two cores busy).
    cpu_pct: f64,
    rss_kb_before: u64,
    rss_kb_after: u64,
    hwm_kb: u64,
}

impl ServerStats {
    fn between(before: &ProcSample, after: &ProcSample, wall_secs: f64) -> ServerStats {
        let cpu_s = after.cpu_secs - before.cpu_secs;
        ServerStats {
            cpu_s,
            cpu_pct: if wall_secs > 0.0 { cpu_s / wall_secs * 100.0 } else { 0.0 },
            rss_kb_before: before.rss_kb,
            rss_kb_after: after.rss_kb,
            hwm_kb: after.hwm_kb,
        }
    }
}

#[derive(Debug, Serialize)]
struct IdleStats {
    requested: usize,
    connected: usize,
    dropped_during_hold: usize,
    open_secs: f64,
    rss_kb_before: Option<u64>,
    rss_kb_after_open: Option<u64>,
    rss_kb_after_hold: Option<u64>,
    bytes_per_conn_after_open: Option<f64>,
    bytes_per_conn_after_hold: Option<f64>,
}

#[derive(Debug, Serialize)]
struct StormStats {
    requested: usize,
    connected: usize,
    concurrency: usize,
    elapsed_s: f64,
    connects_per_s: f64,
    connack_latency_us: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct Report {
    scenario: Scenario,
    target: String,
    protocol: &'static str,
    qos: u8,
    clients: usize,
    payload: usize,
    duration_s: f64,
    rate_target: Option<f64>,
    inflight: u16,
    nofile_limit: Option<u64>,
    /// Seconds of publishing the rates are computed over (`--duration`, or less with `--count`).
    #[serde(skip_serializing_if = "Option::is_none")]
    publish_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publishers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscribers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<MessageStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle: Option<IdleStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    storm: Option<StormStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_fill: Option<state::FillStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect: Option<state::ReconnectStats>,
    /// state-offsets: the sum of the end offsets of each state topic's partitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_offsets: Option<std::collections::BTreeMap<String, i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<ServerStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cpu_s: Option<f64>,
    error_count: usize,
    /// The first few errors.
    errors: Vec<String>,
}

impl Report {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }

    fn print_text(&self) {
        println!(
            "scenario {:?} against {} ({}, QoS {}, {} clients, {} B payload, {} s)",
            self.scenario, self.target, self.protocol, self.qos, self.clients, self.payload, self.duration_s
        );
        if let Some(m) = &self.messages {
            println!("  sent      {:>12} ({:.0} msg/s)", m.sent, m.sent_per_s);
            if let (Some(a), Some(u)) = (m.acked, m.unacked) {
                println!("  acked     {a:>12} (unacked at end: {u})");
            }
            println!("  received  {:>12} ({:.0} msg/s in window)", m.received, m.received_per_s);
            println!(
                "  expected  {:>12}  unique {}  lost {}  duplicates {}  out-of-order {}",
                m.expected, m.unique, m.lost, m.duplicates, m.out_of_order
            );
            if let Some(l) = &m.ack_latency_us {
                println!(
                    "  ack latency µs p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.0})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean
                );
            }
            if let Some(l) = &m.latency_us {
                println!(
                    "  latency µs p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.0})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean
                );
            }
            if let Some(l) = &m.lateness_us {
                println!(
                    "  lateness µs p50 {} p90 {} p99 {} p99.9 {} max {} (mean {:.0}); early {} (by at most {} µs)",
                    l.p50,
                    l.p90,
                    l.p99,
                    l.p999,
                    l.max,
                    l.mean,
                    m.early.unwrap_or(0),
                    m.early_max_us.unwrap_or(0)
                );
            } else if let Some(e) = m.early {
                println!("  early {e}");
            }
        }
        if let Some(i) = &self.idle {
            println!(
                "  connected {}/{} in {:.1} s, dropped while held: {}",
                i.connected, i.requested, i.open_secs, i.dropped_during_hold
            );
            if let (Some(b), Some(o), Some(h)) = (i.rss_kb_before, i.rss_kb_after_open, i.rss_kb_after_hold) {
                println!("  server RSS kB: before {b}, after open {o}, after hold {h}");
            }
            if let (Some(o), Some(h)) = (i.bytes_per_conn_after_open, i.bytes_per_conn_after_hold) {
                println!("  server RSS per connection: {o:.0} B after open, {h:.0} B after hold");
            }
        }
        if let Some(s) = &self.storm {
            println!(
                "  connected {}/{} in {:.2} s: {:.0} connects/s",
                s.connected, s.requested, s.elapsed_s, s.connects_per_s
            );
            if let Some(l) = &s.connack_latency_us {
                println!("  CONNACK latency µs p50 {} p99 {} p99.9 {} max {}", l.p50, l.p99, l.p999, l.max);
            }
        }
        if let Some(f) = &self.state_fill {
            println!(
                "  wrote {} sessions and {} retained messages in {:.1} s ({:.0} records/s)",
                f.sessions, f.retained, f.elapsed_s, f.records_per_s
            );
        }
        if let Some(r) = &self.reconnect {
            println!(
                "  reconnected {}/{}: session present {}, absent {}",
                r.connected, r.requested, r.session_present, r.session_absent
            );
            if let Some(l) = &r.connack_latency_us {
                println!("  CONNECT → CONNACK µs p50 {} p99 {} max {}", l.p50, l.p99, l.max);
            }
        }
        if let Some(o) = &self.state_offsets {
            for (topic, end) in o {
                println!("  {topic}: {end} records");
            }
        }
        if let Some(s) = &self.server {
            println!(
                "  server CPU {:.2} s ({:.0}%), RSS {} → {} kB (peak {} kB)",
                s.cpu_s, s.cpu_pct, s.rss_kb_before, s.rss_kb_after, s.hwm_kb
            );
        }
        if let Some(c) = self.client_cpu_s {
            println!("  lmq-bench CPU {c:.2} s");
        }
        if self.error_count > 0 {
            println!("  {} errors, first ones:", self.error_count);
            for e in &self.errors {
                println!("    {e}");
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let key = match args.sign.as_deref().map(SignKey::parse).transpose() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("lmq-bench: {e:#}");
            std::process::exit(2);
        }
    };
    let _ = SIGN.set(key);
    if args.scenario == Scenario::MockKafka {
        // Serves until killed; librdkafka runs the cluster on its own threads.
        return match args.validate().and_then(|_| kafka::mock_cluster(&args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lmq-bench: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lmq-bench: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(report) if report.error_count == 0 => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("lmq-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<Report> {
    let addr = args.validate()?;
    now_ns();
    let nofile = match raise_nofile_limit() {
        Ok((soft, _)) => Some(soft),
        Err(e) => {
            eprintln!("lmq-bench: warning: {e:#}");
            None
        }
    };
    if let Some(limit) = nofile {
        let needed = match args.scenario {
            Scenario::FanIn | Scenario::FanOut => args.clients + 1,
            Scenario::P2p => 2 * args.clients,
            Scenario::Idle | Scenario::ConnectStorm => args.clients,
            Scenario::Reconnect => args.concurrency(),
            Scenario::KafkaRaw | Scenario::MockKafka | Scenario::StateFill | Scenario::StateOffsets => 0,
        } as u64;
        if needed + 64 > limit {
            bail!("{needed} connections need more file descriptors than the limit of {limit}; lower --clients or spread the load over several processes");
        }
    }
    let mut report = Report {
        scenario: args.scenario,
        target: addr.to_string(),
        protocol: if args.mqtt5 { "mqtt5" } else { "mqtt3.1.1" },
        qos: args.qos,
        clients: args.clients,
        payload: args.payload,
        duration_s: args.duration,
        rate_target: args.rate,
        inflight: args.inflight,
        nofile_limit: nofile,
        publish_s: None,
        publishers: None,
        subscribers: None,
        messages: None,
        idle: None,
        storm: None,
        state_fill: None,
        reconnect: None,
        state_offsets: None,
        server: None,
        client_cpu_s: None,
        error_count: 0,
        errors: Vec::new(),
    };
    match args.scenario {
        Scenario::FanIn | Scenario::FanOut | Scenario::P2p => message_scenario(&args, addr, &mut report).await?,
        Scenario::Idle => idle_scenario(&args, addr, &mut report).await?,
        Scenario::ConnectStorm => storm_scenario(&args, addr, &mut report).await?,
        Scenario::KafkaRaw => kafka::raw_producer_scenario(&args, &mut report).await?,
        Scenario::StateFill => state::fill(&args, &mut report).await?,
        Scenario::Reconnect => state::reconnect(&args, addr, &mut report).await?,
        Scenario::StateOffsets => state::offsets(&args, &mut report).await?,
        Scenario::MockKafka => unreachable!("mock-kafka runs before the runtime starts"),
    }
    if args.json {
        println!("{}", serde_json::to_string(&report).context("serialising the report")?);
    } else {
        report.print_text();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_counts_duplicates_and_reordering() {
        let mut t = SeqTracker::default();
        assert_eq!(t.record(0), (true, false));
        assert_eq!(t.record(2), (true, false));
        assert_eq!(t.record(1), (true, true));
        assert_eq!(t.record(2), (false, false));
        assert_eq!(t.record(1000), (true, false));
    }

    #[test]
    fn id_pool_skips_ids_in_use() {
        let mut p = IdPool::new();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert_ne!(a, b);
        assert!(p.release(a));
        assert!(!p.release(a));
        assert_eq!(p.count, 1);
    }

    #[test]
    fn delays_per_publisher() {
        let d = parse_delays("1-5").unwrap();
        assert_eq!((0..6).map(|i| d.of(i)).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 1]);
        assert_eq!(d.topic(2, "bench/x/in/2"), "$delayed/3/bench/x/in/2");
        assert_eq!(parse_delays("86400").unwrap().of(7), 86400);
        for bad in ["0", "5-1", "x", "1-", ""] {
            assert!(parse_delays(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_loopback_targets() {
        let mut args = Args::parse_from(["lmq-bench", "fan-in", "--host", "10.0.0.1"]);
        assert!(args.validate().is_err());
        args.host = "127.0.0.1".into();
        assert!(args.validate().is_ok());
    }
}
