//! Runs the backend conformance suite against the RocketMQ core service on a real broker
//! (see `tests/rocketmq_broker` for how the broker is found or started).

mod conformance;
mod rocketmq_broker;

use lmq_gateway::backend::rocketmq::RocketmqCore;
use lmq_gateway::backend::CoreService;
use lmq_gateway::config::RocketmqConfig;
use std::sync::Arc;

const EVENTS: &str = "GID_LMQ_STATUS";

async fn open() -> Option<Arc<RocketmqCore>> {
    let namesrv = rocketmq_broker::namesrv()?;
    let config = RocketmqConfig { namesrv_addr: namesrv, ..Default::default() };
    Some(RocketmqCore::open(&config, EVENTS).await.expect("open rocketmq core"))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(core) = open().await else { return };
            let topic = format!("{}_{}", stringify!($name), rocketmq_broker::run_id());
            conformance::$name(core.as_ref(), &topic).await;
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
    let Some(core) = open().await else { return };
    let client_id = format!("GID_test@@@events{}", rocketmq_broker::run_id());
    conformance::events_written(core.as_ref(), EVENTS, &client_id).await;
    core.shutdown().await;
}
