//! librdkafka client settings and the translation between Kafka messages and core records.

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use std::sync::Arc;

use crate::backend::{BackendError, CoreRecord, Record, TopicPartition};
use crate::config::KafkaConfig;

/// Settings shared by the producer and every consumer. The raw `librdkafka` map comes last;
/// validation has refused the properties the gateway sets itself.
fn common(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", &cfg.client_id)
        // A metadata request must never create a topic: brokers that allow it
        // (`auto.create.topics.enable`, Kafka's default) would create it with their default
        // partition count and settings, not the gateway's (`ensure_topic` creates it instead).
        .set("allow.auto.create.topics", "false")
        .set("log_level", "4");
    for (k, v) in &cfg.librdkafka {
        c.set(k, v);
    }
    c
}

/// The producer: every record is acknowledged by all in-sync replicas, retries cannot
/// duplicate or reorder (idempotence), and a record not stored within `delivery_timeout_ms`
/// fails instead of being retried forever.
pub(super) fn producer(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = common(cfg);
    // Same key → same partition as Java clients (murmur2), so keyed records written by
    // other applications and by the gateway agree.
    c.set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_size.to_string())
        .set("compression.type", &cfg.compression)
        .set("message.timeout.ms", cfg.delivery_timeout_ms.to_string());
    c
}

/// A consumer with manual assignment: no group membership, no commits (librdkafka wants a
/// `group.id` for `assign` all the same; it is never joined).
pub(super) fn consumer(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = common(cfg);
    c.set("group.id", format!("{}-assigned", cfg.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string());
    c
}

/// The high watermark (end offset) of one partition. Errors a leader election gives for a
/// moment (a topic just created, a broker restarting) are retried until `timeout`.
pub(super) fn high_watermark<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
    timeout: std::time::Duration,
) -> Result<i64, BackendError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match client.fetch_watermarks(topic, partition, left) {
            Ok((_, high)) => return Ok(high),
            Err(e) if transient(&e) && std::time::Instant::now() + LEADER_RETRY < deadline => {
                std::thread::sleep(LEADER_RETRY);
            }
            Err(e) => return Err(error(e)),
        }
    }
}

const LEADER_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// An error that a leader election explains and that goes away by itself.
fn transient(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownLeaderEpoch
                | RDKafkaErrorCode::FencedLeaderEpoch
        )
    )
}

/// Map a librdkafka error onto the trait's errors.
pub(super) fn error(e: KafkaError) -> BackendError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            BackendError::unknown_topic_from("", e)
        }
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::TopicAuthorizationFailed,
        ) => BackendError::rejected_from("", e),
        Some(RDKafkaErrorCode::MessageTimedOut) | Some(RDKafkaErrorCode::OperationTimedOut) => {
            BackendError::unavailable_from("Kafka did not store the record in time", e)
        }
        _ => BackendError::unavailable_from("", e),
    }
}

/// Record headers as Kafka headers.
pub(super) fn headers(record: &CoreRecord) -> OwnedHeaders {
    record.headers.iter().fold(OwnedHeaders::new_with_capacity(record.headers.len()), |h, (k, v)| {
        h.insert(Header { key: k, value: Some(&v[..]) })
    })
}

/// A consumed message as a stored record (`tp` is the caller's interned topic name).
pub(super) fn record(tp: TopicPartition, m: &BorrowedMessage<'_>) -> Arc<Record> {
    let headers = m
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_owned(), Bytes::copy_from_slice(h.value.unwrap_or_default()))).collect())
        .unwrap_or_default();
    Arc::new(Record {
        tp,
        offset: u64::try_from(m.offset()).unwrap_or(0),
        record: CoreRecord {
            key: m.key().map(Bytes::copy_from_slice),
            headers,
            value: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        },
    })
}

/// The partition Kafka's Java client (and librdkafka's `murmur2_random`) picks for a key:
/// `(murmur2(key) & 0x7fffffff) % partitions`. State records are written to this partition
/// explicitly, so a read knows the one partition to catch up on whatever partitioner the
/// `librdkafka` options set. Public (re-exported as `backend::kafka::key_partition`) so that
/// tools writing state records around the gateway (`lmq-bench state-fill`) place them alike.
pub fn key_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers from Kafka's `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, expected, "murmur2({key})");
        }
        assert_eq!(key_partition(b"21", 1), 0);
        assert!(key_partition(b"any", 4) < 4);
    }
}
