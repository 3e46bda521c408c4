//! Kafka scenarios: the baseline the gateway's Kafka core service is measured against, and a
//! broker to measure it on.
//!
//! - `kafka-raw`: N senders on one librdkafka producer, each keeping `--inflight` records in
//!   flight like an MQTT publisher keeps QoS 1 messages unacknowledged. The records are the ones
//!   the gateway writes for a QoS 1 fan-in publisher (built with the gateway's own mapping: key =
//!   ClientId, LMQ headers `topic`, `mqttSecondTopic`, `qoslevel`, `clientId`, same payload size,
//!   publish timestamp), and the producer has the gateway's settings. Throughput counts delivery
//!   reports; latency is send → delivery report, the equivalent of publish → PUBACK.
//! - `mock-kafka`: librdkafka's in-process mock cluster (one broker) with the gateway's topics
//!   created — it has no CreateTopics — printing its bootstrap servers and serving until killed.

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use lmq_gateway::backend::CoreRecord;
use lmq_gateway::config::{KafkaConfig, TopicsConfig};
use lmq_gateway::protocol::{QoS, UserProperties};
use lmq_gateway::router::mapping::{Message, TopicMap};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::{
    now_ns, run_tag, self_cpu_secs, wait_clock, Args, Clock, Latency, MessageStats, PubResult, Report, HEADER_LEN,
};

/// Longest wait for topic creation, metadata and the first delivery.
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);

/// `bootstrap.servers` must name loopback addresses only.
pub(super) fn check_bootstrap(list: &str) -> Result<()> {
    for server in list.split(',').map(str::trim) {
        let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!("--bootstrap {server:?} is not a loopback address; lmq-bench only targets the local machine");
        }
    }
    Ok(())
}

/// The producer settings of the gateway's Kafka core service (`common` and `producer` in
/// `src/backend/kafka/client.rs`, which the library does not export), so the baseline pays for
/// the same guarantees: acks=all, idempotence, and the same batching and compression.
fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("client.id", "lmq-bench")
        .set("partitioner", "murmur2_random")
        .set("log_level", "4")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", kafka.linger_ms.to_string())
        .set("batch.size", kafka.batch_size.to_string())
        .set("compression.type", &kafka.compression)
        .set("message.timeout.ms", kafka.delivery_timeout_ms.to_string());
    c
}

/// Create `topic` unless the cluster has it (listing all topics: a metadata request naming a
/// topic would create it on brokers with auto-creation, with their default partition count).
async fn ensure_topic(kafka: &KafkaConfig, topic: &str, partitions: u32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        producer_config(kafka).create().context("creating the admin client")?;
    if topic_partitions(&admin, topic).await?.is_none() {
        let new = NewTopic::new(
            topic,
            i32::try_from(partitions).context("--partitions")?,
            TopicReplication::Fixed(kafka.replication_factor),
        );
        let opts = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
        let results = admin.create_topics([&new], &opts).await.context("creating the topic")?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => bail!("cannot create Kafka topic {t:?}: {code}"),
            }
        }
    }
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match topic_partitions(&admin, topic).await? {
            Some(n) if n as u64 != u64::from(partitions) => {
                eprintln!("lmq-bench: warning: topic {topic:?} has {n} partitions, not {partitions}");
                return Ok(());
            }
            Some(_) => return Ok(()),
            None if Instant::now() > deadline => bail!("topic {topic:?} did not appear in the metadata"),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn topic_partitions(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Result<Option<usize>> {
    let md = tokio::task::block_in_place(|| admin.inner().fetch_metadata(None, SETUP_TIMEOUT))
        .context("fetching the cluster metadata")?;
    Ok(md.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len()))
}

fn epoch_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The record the gateway writes when publisher `client_id` publishes at QoS 1 on `topic`.
fn gateway_record(map: &TopicMap, topic: &str, client_id: &str, payload: usize) -> CoreRecord {
    map.to_record(&Message {
        topic: topic.into(),
        payload: vec![0u8; payload].into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        publisher: client_id.into(),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: UserProperties::default(),
        timestamp_ms: epoch_ms(),
        msg_id: None,
    })
}

struct Sender {
    producer: FutureProducer,
    core_topic: Arc<str>,
    record: CoreRecord,
    index: u32,
    window: usize,
}

async fn sender(s: Sender, mut clock_rx: watch::Receiver<Option<Clock>>) -> Result<PubResult> {
    let clock = wait_clock(&mut clock_rx).await?;
    let headers = s.record.headers.iter().fold(OwnedHeaders::new_with_capacity(s.record.headers.len()), |h, (k, v)| {
        h.insert(Header { key: k, value: Some(&v[..]) })
    });
    let key = s.record.key.clone().unwrap_or_default();
    let mut value = s.record.value.to_vec();
    value[8..12].copy_from_slice(&s.index.to_be_bytes());
    let mut inflight = FuturesUnordered::new();
    let mut res = PubResult::new();
    let mut seq: u32 = 0;
    let mut backoff = Duration::from_millis(1);
    let timer = sleep_until(clock.stop);
    tokio::pin!(timer);
    loop {
        let now = Instant::now();
        if now >= clock.deadline {
            res.unacked = inflight.len() as u64;
            break;
        }
        let publishing = now < clock.stop;
        if !publishing && inflight.is_empty() {
            break;
        }
        if publishing && inflight.len() < s.window {
            let t_ns = now_ns();
            value[..8].copy_from_slice(&t_ns.to_be_bytes());
            value[12..HEADER_LEN].copy_from_slice(&seq.to_be_bytes());
            let record = FutureRecord::to(&s.core_topic)
                .key(&key[..])
                .payload(&value[..])
                .headers(headers.clone())
                .timestamp(epoch_ms());
            match s.producer.send_result(record) {
                Ok(delivery) => {
                    seq = seq.wrapping_add(1);
                    res.sent += 1;
                    backoff = Duration::from_millis(1);
                    inflight.push(async move { (t_ns, delivery.await) });
                    continue;
                }
                // librdkafka's queue is full: wait for a delivery report, as the gateway does.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if inflight.is_empty() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                    continue;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {}
                Err((e, _)) => bail!("producing: {e}"),
            }
        }
        let wake = if publishing { clock.stop } else { clock.deadline };
        if timer.deadline() != wake {
            timer.as_mut().reset(wake);
        }
        tokio::select! {
            Some((t_ns, delivery)) = inflight.next(), if !inflight.is_empty() => match delivery {
                Ok(Ok(_)) => res.ack(t_ns, Instant::now() < clock.stop),
                Ok(Err((e, _))) => bail!("delivery failed: {e}"),
                Err(_) => bail!("delivery report lost (producer closed)"),
            },
            _ = &mut timer => {}
        }
    }
    Ok(res)
}

/// `kafka-raw`: see the module docs.
pub(super) async fn raw_producer_scenario(args: &Args, report: &mut Report) -> Result<()> {
    let kafka =
        KafkaConfig { bootstrap_servers: args.bootstrap.clone(), linger_ms: args.linger_ms, ..KafkaConfig::default() };
    let map = TopicMap::new(&TopicsConfig::default(), Default::default());
    let core_topic: Arc<str> = map
        .core_topic(&args.topic_prefix)
        .ok_or_else(|| anyhow!("--topic-prefix {:?} is not a valid core topic name", args.topic_prefix))?
        .name;
    ensure_topic(&kafka, &core_topic, args.partitions).await?;
    let producer: FutureProducer = producer_config(&kafka).create().context("creating the producer")?;

    // Warm-up: connections, producer id and topic metadata are not part of the measurement.
    let tag = run_tag();
    let warm = gateway_record(&map, &format!("{}/{tag}/warm-up", args.topic_prefix), "lb-warm-up", args.payload);
    let first = FutureRecord::to(&core_topic).key(&b"lb-warm-up"[..]).payload(&warm.value[..]);
    let delivery = producer.send_result(first).map_err(|(e, _)| anyhow!("producing the first record: {e}"))?;
    timeout(SETUP_TIMEOUT, delivery)
        .await
        .map_err(|_| anyhow!("the first record was not delivered within {SETUP_TIMEOUT:?}"))?
        .map_err(|_| anyhow!("delivery report lost"))?
        .map_err(|(e, _)| anyhow!("the first record failed: {e}"))?;

    let (clock_tx, _) = watch::channel(None);
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let client_id = format!("lb-{tag}-p{i}");
        let topic = format!("{}/{tag}/in/{i}", args.topic_prefix);
        let s = Sender {
            producer: producer.clone(),
            core_topic: Arc::clone(&core_topic),
            record: gateway_record(&map, &topic, &client_id, args.payload),
            index: u32::try_from(i).context("--clients")?,
            window: usize::from(args.inflight),
        };
        tasks.push(tokio::spawn(sender(s, clock_tx.subscribe())));
    }
    let client_before = self_cpu_secs();
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(args.duration);
    let deadline = stop + Duration::from_secs_f64(args.drain);
    clock_tx.send_replace(Some(Clock { start, stop, deadline }));

    let mut total = PubResult::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => total.add(&r)?,
            Ok(Err(e)) => report.error(format!("sender: {e:#}")),
            Err(e) => report.error(format!("sender task: {e}")),
        }
    }
    let secs = args.duration;
    report.client_cpu_s = Some(self_cpu_secs() - client_before);
    report.target = args.bootstrap.clone();
    report.protocol = "kafka";
    report.qos = 1;
    report.publishers = Some(args.clients);
    report.subscribers = Some(0);
    report.messages = Some(MessageStats {
        sent: total.sent,
        sent_per_s: total.sent as f64 / secs,
        acked: Some(total.acked),
        acked_per_s: Some(total.acked_in_window as f64 / secs),
        delay_secs: None,
        lateness_us: None,
        early: None,
        early_max_us: None,
        unacked: Some(total.unacked),
        expected: 0,
        received: 0,
        received_per_s: 0.0,
        unique: 0,
        duplicates: 0,
        out_of_order: 0,
        lost: 0,
        latency_us: None,
        ack_latency_us: Latency::from_hist(&total.ack_hist),
    });
    Ok(())
}

/// `mock-kafka`: see the module docs. Never returns unless the cluster fails to start.
pub(super) fn mock_cluster(args: &Args) -> Result<()> {
    let cluster = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let topics = TopicsConfig::default();
    let kafka = KafkaConfig::default();
    let state = &kafka.state_topics;
    let gateway_topics = [
        &topics.events_topic,
        &state.sessions,
        &state.retained,
        &state.credentials,
        &state.revoked_tokens,
        &state.delay,
    ];
    let partitions = i32::try_from(kafka.partitions).context("partitions")?;
    for topic in gateway_topics {
        cluster.create_topic(topic, partitions, 1).with_context(|| format!("creating {topic:?}"))?;
    }
    let parent = i32::try_from(args.partitions).context("--partitions")?;
    cluster.create_topic(&args.topic_prefix, parent, 1).with_context(|| format!("creating {:?}", args.topic_prefix))?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", cluster.bootstrap_servers()).and_then(|()| out.flush()).context("writing to stdout")?;
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_must_be_loopback() {
        assert!(check_bootstrap("localhost:9092").is_ok());
        assert!(check_bootstrap("127.0.0.1:1,[::1]:2").is_ok());
        assert!(check_bootstrap("localhost:9092,kafka.example.com:9092").is_err());
        assert!(check_bootstrap("10.0.0.1:9092").is_err());
    }
}
