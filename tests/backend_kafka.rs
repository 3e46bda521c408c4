//! Runs the backend conformance suite against the Kafka core service on a real
//! Kafka-protocol broker (tansu, started by `tests/kafka_broker`).

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

conformance!(
    append_then_fetch,
    ack_means_visible,
    fetch_from_position,
    per_key_order,
    tail_delivers_new_records,
    sessions_store,
    retained_store_and_watch,
    auth_stores,
    unknown_topic_refused,
    closed_service_refuses,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written() {
    let core = open().await;
    conformance::events_written(core.as_ref(), EVENTS, "client-events-1").await;
    core.shutdown().await;
}
