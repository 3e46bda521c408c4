//! Runs the backend conformance suite against the Kafka core service on a real
//! Kafka-protocol broker (tansu, started by `tests/kafka_broker`).

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
