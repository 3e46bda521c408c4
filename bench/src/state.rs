//! Fleet-scale state on the Kafka core service: what the gateway loads at start and serves
//! reconnecting sessions from.
//!
//! - `state-fill`: N persistent sessions and M retained messages written straight into the
//!   gateway's compacted state topics, with the gateway's own encodings (`Stored::encode`,
//!   `encode_record` of the record a retained PUBLISH stores), keys and partitions
//!   (`key_partition`), by one producer with the gateway's guarantees (acks=all, idempotence)
//!   batching as much as it can. A state topic that does not exist yet is created as the gateway
//!   creates it (compacted, `--partitions`, replication factor 1).
//! - `reconnect`: K of the N sessions, chosen at random, connect with clean session 0 (MQTT
//!   3.1.1), C at a time; CONNECT written → CONNACK read, and how many CONNACKs said "session
//!   present" (all of them should).
//! - `state-offsets`: the sum of the end offsets of every state topic's partitions: records
//!   written into it so far (compaction does not lower end offsets).

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use lmq_gateway::backend::kafka::key_partition;
use lmq_gateway::config::{KafkaConfig, KafkaStateTopics, TopicsConfig};
use lmq_gateway::protocol::{Protocol, QoS, UserProperties};
use lmq_gateway::router::mapping::{encode_record, Message, TopicMap};
use lmq_gateway::session::persist::{Stored, StoredPosition, StoredSubscription};
use rand::seq::index::sample;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{new_histogram, Args, Conn, Latency, Report};

/// Longest wait for topic creation and metadata.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Records handed to librdkafka and not yet reported delivered, at most.
const IN_FLIGHT: usize = 200_000;
/// Retained messages are spread over this many second-level topics (`<prefix>/<i % 1000>/r<i>`).
const RETAINED_SPREAD: usize = 1000;

/// Options of the state scenarios.
#[derive(Debug, clap::Args)]
pub(super) struct StateArgs {
    /// state-fill: persistent sessions to write; reconnect: how many were written (the
    /// ClientIds are `--client-id-prefix` + 0..N).
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// state-fill: retained messages to write (topics `<topic-prefix>/<i % 1000>/r<i>`).
    #[arg(long, default_value_t = 10_000)]
    retained: usize,
    /// state-fill: subscriptions per session (`<topic-prefix>/<i>/<j>/#`, QoS 1).
    #[arg(long, default_value_t = 2)]
    subscriptions: usize,
    /// ClientId of session i: this + i.
    #[arg(long = "client-id-prefix", alias = "prefix", default_value = "GID_bench@@@s")]
    client_id_prefix: String,
    /// state-fill: session expiry of the written sessions, seconds (disconnected now).
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    expiry_secs: u32,
    /// state-fill: payload of each retained message, bytes.
    #[arg(long, default_value_t = 64)]
    retained_payload: usize,
    /// state-fill: producer `linger.ms` (larger batches than the gateway's 5 ms).
    #[arg(long, default_value_t = 50)]
    fill_linger_ms: u64,
    /// The gateway's sessions topic (`core.kafka.state_topics.sessions`).
    #[arg(long, default_value_t = KafkaStateTopics::default().sessions)]
    sessions_topic: String,
    /// The gateway's retained-messages topic (`core.kafka.state_topics.retained`).
    #[arg(long, default_value_t = KafkaStateTopics::default().retained)]
    retained_topic: String,
}

impl StateArgs {
    pub(super) fn validate(&self, reconnect: bool, clients: usize) -> Result<()> {
        if self.client_id_prefix.is_empty() || self.sessions_topic.is_empty() || self.retained_topic.is_empty() {
            bail!("--client-id-prefix, --sessions-topic and --retained-topic must not be empty");
        }
        if self.subscriptions == 0 && self.sessions > 0 {
            bail!("--subscriptions must be at least 1");
        }
        if reconnect && (self.sessions == 0 || clients > self.sessions) {
            bail!("reconnect: --clients ({clients}) must be between 1 and --sessions ({})", self.sessions);
        }
        if self.retained_payload == 0 {
            bail!("--retained-payload must be at least 1 (an empty retained payload deletes)");
        }
        Ok(())
    }

    fn client_id(&self, i: usize) -> String {
        format!("{}{i}", self.client_id_prefix)
    }
}

#[derive(Debug, Serialize)]
pub(super) struct FillStats {
    pub(super) sessions: usize,
    pub(super) retained: usize,
    pub(super) subscriptions_per_session: usize,
    pub(super) sessions_topic: String,
    pub(super) sessions_partitions: u32,
    pub(super) retained_topic: String,
    pub(super) retained_partitions: u32,
    /// Bytes of keys and values written (before compression).
    pub(super) session_bytes: u64,
    pub(super) retained_bytes: u64,
    pub(super) elapsed_s: f64,
    pub(super) records_per_s: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct ReconnectStats {
    pub(super) requested: usize,
    pub(super) connected: usize,
    /// Out of `--sessions` ClientIds.
    pub(super) sessions: usize,
    pub(super) concurrency: usize,
    /// CONNACKs with session present = 1 (the stored session was found).
    pub(super) session_present: usize,
    /// CONNACKs with session present = 0 (the gateway did not find the stored session).
    pub(super) session_absent: usize,
    pub(super) elapsed_s: f64,
    /// CONNECT written → CONNACK read, µs.
    pub(super) connack_latency_us: Option<Latency>,
}

fn epoch_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The gateway's producer settings (`src/backend/kafka/client.rs`), batching longer.
fn producer(args: &Args) -> Result<FutureProducer> {
    let kafka = KafkaConfig { bootstrap_servers: args.bootstrap.clone(), ..KafkaConfig::default() };
    let mut c = rdkafka::config::ClientConfig::new();
    c.set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("client.id", "lmq-bench-state-fill")
        .set("allow.auto.create.topics", "false")
        .set("log_level", "4")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", args.state.fill_linger_ms.to_string())
        .set("batch.size", kafka.batch_size.to_string())
        .set("compression.type", &kafka.compression)
        .set("message.timeout.ms", "120000")
        .set("queue.buffering.max.messages", (2 * IN_FLIGHT).to_string());
    c.create().context("creating the producer")
}

/// Partitions of `topic`, creating it as the gateway would (compacted) when missing.
async fn state_topic(admin: &AdminClient<DefaultClientContext>, topic: &str, partitions: u32) -> Result<u32> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut created = false;
    loop {
        let md = tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, SETUP_TIMEOUT))
            .context("fetching the cluster metadata")?;
        let found = md.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len());
        match found {
            Some(n) if n > 0 => return u32::try_from(n).context("partition count"),
            _ if Instant::now() > deadline => bail!("topic {topic:?} did not appear in the metadata"),
            _ if !created => {
                let new = NewTopic::new(
                    topic,
                    i32::try_from(partitions).context("--partitions")?,
                    TopicReplication::Fixed(1),
                )
                .set("cleanup.policy", "compact");
                let opts = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
                for r in admin.create_topics([&new], &opts).await.context("creating the topic")? {
                    match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((t, code)) => bail!("cannot create Kafka topic {t:?}: {code}"),
                    }
                }
                eprintln!("lmq-bench: created {topic:?} (compacted, {partitions} partitions)");
                created = true;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Keeps at most [`IN_FLIGHT`] records in librdkafka and fails on the first failed delivery.
struct Writer {
    producer: FutureProducer,
    inflight: FuturesUnordered<DeliveryFuture>,
    written: u64,
}

impl Writer {
    async fn send(&mut self, topic: &str, partition: u32, key: &[u8], value: &[u8]) -> Result<()> {
        let partition = i32::try_from(partition).context("partition")?;
        loop {
            if self.inflight.len() >= IN_FLIGHT {
                self.complete_one().await?;
            }
            let record = FutureRecord::to(topic).partition(partition).key(key).payload(value).timestamp(epoch_ms());
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.inflight.push(delivery);
                    self.written += 1;
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if !self.inflight.is_empty() => {
                    self.complete_one().await?;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("producing to {topic}: {e}"),
            }
        }
    }

    async fn complete_one(&mut self) -> Result<()> {
        match self.inflight.next().await {
            Some(Ok(Ok(_))) | None => Ok(()),
            Some(Ok(Err((e, _)))) => bail!("delivery failed: {e}"),
            Some(Err(_)) => bail!("delivery report lost (producer closed)"),
        }
    }

    async fn finish(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.complete_one().await?;
        }
        self.producer.flush(SETUP_TIMEOUT).map_err(|e| anyhow!("flushing the producer: {e}"))
    }
}

/// The stored session of ClientId `client_id` (index `i`): disconnected now, subscribed to
/// `subscriptions` filters, positions at 0 in every partition of the parent's core topic.
fn session(args: &Args, i: usize, core: &(String, u32), now_ms: i64) -> Stored {
    let s = &args.state;
    Stored {
        version: Stored::VERSION,
        client_id: s.client_id(i),
        owner: None,
        expiry_secs: s.expiry_secs,
        disconnected_at_ms: Some(now_ms),
        subscriptions: (0..s.subscriptions)
            .map(|j| StoredSubscription {
                filter: format!("{}/{i}/{j}/#", args.topic_prefix),
                qos: QoS::AtLeastOnce as u8,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
                identifier: None,
            })
            .collect(),
        positions: (0..core.1)
            .map(|p| StoredPosition { topic: core.0.clone(), partition: p, committed: 0, acked: Vec::new() })
            .collect(),
        inflight: Vec::new(),
        inbound_qos2: Vec::new(),
        qos2_intents: Vec::new(),
    }
}

/// The record the gateway stores in the retained store for a retained QoS 1 PUBLISH.
fn retained_record(map: &TopicMap, topic: &str, payload: usize) -> bytes::Bytes {
    encode_record(&map.to_record(&Message {
        topic: topic.into(),
        payload: vec![b'r'; payload].into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        publisher: "GID_bench@@@publisher".into(),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: UserProperties::default(),
        timestamp_ms: epoch_ms(),
        msg_id: None,
    }))
}

/// `state-fill`: see the module docs.
pub(super) async fn fill(args: &Args, report: &mut Report) -> Result<()> {
    let s = &args.state;
    let producer = producer(args)?;
    let admin: AdminClient<DefaultClientContext> = {
        let mut c = rdkafka::config::ClientConfig::new();
        c.set("bootstrap.servers", &args.bootstrap).set("log_level", "4");
        c.create().context("creating the admin client")?
    };
    let sessions_partitions = state_topic(&admin, &s.sessions_topic, args.partitions).await?;
    let retained_partitions = state_topic(&admin, &s.retained_topic, args.partitions).await?;
    let map = TopicMap::new(&TopicsConfig::default(), Default::default());
    let core = map
        .core_topic(&args.topic_prefix)
        .map(|t| (t.name.to_string(), t.partitions))
        .ok_or_else(|| anyhow!("--topic-prefix {:?} has no core topic", args.topic_prefix))?;
    let mut w = Writer { producer, inflight: FuturesUnordered::new(), written: 0 };
    let start = Instant::now();
    let now_ms = epoch_ms();
    let (mut session_bytes, mut retained_bytes) = (0u64, 0u64);
    let mut last_note = Instant::now();
    for i in 0..s.sessions {
        let stored = session(args, i, &core, now_ms);
        let value = stored.encode();
        let key = stored.client_id.as_bytes();
        session_bytes += (key.len() + value.len()) as u64;
        w.send(&s.sessions_topic, key_partition(key, sessions_partitions), key, &value).await?;
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!("lmq-bench: {i} sessions written ({:.0} s)", start.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
    }
    let payload = s.retained_payload;
    for i in 0..s.retained {
        let topic = format!("{}/{}/r{i}", args.topic_prefix, i % RETAINED_SPREAD);
        let value = retained_record(&map, &topic, payload);
        retained_bytes += (topic.len() + value.len()) as u64;
        w.send(&s.retained_topic, key_partition(topic.as_bytes(), retained_partitions), topic.as_bytes(), &value)
            .await?;
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!("lmq-bench: {i} retained messages written ({:.0} s)", start.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
    }
    w.finish().await?;
    let elapsed = start.elapsed().as_secs_f64();
    report.target = args.bootstrap.clone();
    report.protocol = "kafka";
    report.state_fill = Some(FillStats {
        sessions: s.sessions,
        retained: s.retained,
        subscriptions_per_session: s.subscriptions,
        sessions_topic: s.sessions_topic.clone(),
        sessions_partitions,
        retained_topic: s.retained_topic.clone(),
        retained_partitions,
        session_bytes,
        retained_bytes,
        elapsed_s: elapsed,
        records_per_s: w.written as f64 / elapsed.max(1e-9),
    });
    Ok(())
}

/// `reconnect`: see the module docs.
pub(super) async fn reconnect(args: &Args, addr: SocketAddr, report: &mut Report) -> Result<()> {
    let s = &args.state;
    let chosen: Vec<usize> = sample(&mut rand::thread_rng(), s.sessions, args.clients).into_vec();
    let concurrency = args.concurrency();
    let sem = Arc::new(Semaphore::new(concurrency));
    let protocol = if args.mqtt5 { Protocol::V5 } else { Protocol::V311 };
    let start = Instant::now();
    let tasks: Vec<_> = chosen
        .into_iter()
        .map(|i| {
            let sem = Arc::clone(&sem);
            let client_id = s.client_id(i);
            let keepalive = args.keepalive;
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|_| anyhow!("semaphore closed"))?;
                let (conn, took) = Conn::open_timed(addr, protocol, client_id.clone(), keepalive, false)
                    .await
                    .with_context(|| format!("session {client_id}"))?;
                let present = conn.session_present;
                conn.close().await;
                Ok::<_, anyhow::Error>((took, present))
            })
        })
        .collect();
    let mut hist = new_histogram();
    let (mut connected, mut present, mut absent) = (0, 0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok((took, p))) => {
                connected += 1;
                hist.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
                if p {
                    present += 1;
                } else {
                    absent += 1;
                }
            }
            Ok(Err(e)) => report.error(format!("reconnect: {e:#}")),
            Err(e) => report.error(format!("reconnect task: {e}")),
        }
    }
    if absent > 0 {
        report.error(format!("{absent} CONNACKs said session present 0: the stored session was not found"));
    }
    report.reconnect = Some(ReconnectStats {
        requested: args.clients,
        connected,
        sessions: s.sessions,
        concurrency,
        session_present: present,
        session_absent: absent,
        elapsed_s: start.elapsed().as_secs_f64(),
        connack_latency_us: Latency::from_hist(&hist),
    });
    Ok(())
}

/// `state-offsets`: see the module docs.
pub(super) async fn offsets(args: &Args, report: &mut Report) -> Result<()> {
    let names = KafkaStateTopics {
        sessions: args.state.sessions_topic.clone(),
        retained: args.state.retained_topic.clone(),
        ..KafkaStateTopics::default()
    };
    let topics = [names.sessions, names.retained, names.credentials, names.revoked_tokens, names.delay];
    let mut c = rdkafka::config::ClientConfig::new();
    c.set("bootstrap.servers", &args.bootstrap).set("log_level", "4");
    let consumer: rdkafka::consumer::BaseConsumer = c.create().context("creating a client")?;
    let out = tokio::task::block_in_place(|| -> Result<BTreeMap<String, i64>> {
        use rdkafka::consumer::Consumer;
        let md = consumer.fetch_metadata(None, SETUP_TIMEOUT).context("fetching the cluster metadata")?;
        let mut out = BTreeMap::new();
        for topic in topics {
            let Some(t) = md.topics().iter().find(|t| t.name() == topic && t.error().is_none()) else { continue };
            let mut sum = 0;
            for p in t.partitions() {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p.id(), SETUP_TIMEOUT)
                    .with_context(|| format!("end offset of {topic}-{}", p.id()))?;
                sum += high;
            }
            out.insert(topic, sum);
        }
        Ok(out)
    })?;
    report.target = args.bootstrap.clone();
    report.protocol = "kafka";
    report.state_offsets = Some(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn sessions_and_retained_records_decode_as_the_gateway_reads_them() {
        let args = Args::parse_from(["lmq-bench", "state-fill", "--subscriptions", "3"]);
        let stored = session(&args, 7, &("bench".into(), 4), 1_000);
        let back = Stored::decode(&stored.encode()).expect("decodes");
        assert_eq!(back.client_id, "GID_bench@@@s7");
        assert_eq!(back.subscriptions.len(), 3);
        assert_eq!(back.subscriptions[0].filter, "bench/7/0/#");
        assert_eq!(back.positions.len(), 4);
        assert!(!back.expired(2_000));
        let map = TopicMap::new(&TopicsConfig::default(), Default::default());
        let rec =
            lmq_gateway::router::mapping::decode_record(retained_record(&map, "bench/1/r1", 64)).expect("decodes");
        let msg = lmq_gateway::router::mapping::record_to_message("bench", &rec).expect("a message");
        assert_eq!((&*msg.topic, msg.payload.len()), ("bench/1/r1", 64));
    }
}
