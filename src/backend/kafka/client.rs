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
        // Same key → same partition as Java clients (murmur2), so keyed records written by
        // other applications and by the gateway agree.
        .set("partitioner", "murmur2_random")
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
    c.set("acks", "all")
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

/// Map a librdkafka error onto the trait's errors.
pub(super) fn error(e: KafkaError) -> BackendError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            BackendError::UnknownTopic(e.to_string())
        }
        Some(RDKafkaErrorCode::MessageTimedOut) | Some(RDKafkaErrorCode::OperationTimedOut) => {
            BackendError::Unavailable(format!("Kafka did not store the record in time: {e}"))
        }
        _ => BackendError::Unavailable(e.to_string()),
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
