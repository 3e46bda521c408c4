//! Runs the backend conformance suite against the Kafka core service on a real
//! Apache Kafka broker (started by `tests/kafka_broker`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[macro_use]
mod conformance;
mod kafka_broker;

use lmq_gateway::backend::kafka::KafkaCore;
use lmq_gateway::backend::CoreService;
use std::sync::Arc;

const EVENTS: &str = "GID_LMQ_STATUS";

async fn open() -> Arc<KafkaCore> {
    let broker = kafka_broker::shared();
    KafkaCore::open(&broker.config(), EVENTS).await.expect("open Kafka core service")
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let core = open().await;
            conformance::$name(core.as_ref(), stringify!($name)).await;
            core.shutdown().await;
        }
    )*};
}

for_each_check!(conformance);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written() {
    let core = open().await;
    conformance::events_written(core.as_ref(), EVENTS, "client-events-1").await;
    core.shutdown().await;
}

/// Topics the gateway creates carry `min.insync.replicas` when it is configured (a topic-level
/// setting, not the broker's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_carry_min_insync_replicas() {
    use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let broker = kafka_broker::shared();
    let config = lmq_gateway::config::KafkaConfig { min_insync_replicas: Some(1), ..broker.config() };
    let core = KafkaCore::open(&config, EVENTS).await.expect("open Kafka core service");
    core.ensure_topic("kminisr", 2).await.expect("topic created");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().expect("admin client");
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic("kminisr")], &AdminOptions::new())
        .await
        .expect("describe configs");
    let resource = described.into_iter().next().expect("one resource").expect("topic described");
    let entry = resource.get("min.insync.replicas").expect("min.insync.replicas listed");
    assert_eq!(entry.value.as_deref(), Some("1"));
    assert!(matches!(entry.source, ConfigSource::DynamicTopic), "set on the topic, not inherited: {:?}", entry.source);
    core.shutdown().await;
}
