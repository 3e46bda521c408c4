//! Runs the backend conformance suite against the RocketMQ core service on a real broker
//! (see `tests/rocketmq_broker` for how the broker is found or started).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

#[macro_use]
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

for_each_check!(conformance);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written() {
    let Some(core) = open().await else { return };
    let client_id = format!("GID_test@@@events{}", rocketmq_broker::run_id());
    conformance::events_written(core.as_ref(), EVENTS, &client_id).await;
    core.shutdown().await;
}

/// `cargo test --release --test backend_rocketmq -- --ignored --nocapture throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn throughput() {
    const TASKS: usize = 8;
    const PER_TASK: usize = 500;
    let Some(core) = open().await else { return };
    let topic = format!("bench_{}", rocketmq_broker::run_id());
    core.ensure_topic(&topic, 4).await.unwrap();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let core = Arc::clone(&core);
            let topic = topic.clone();
            tokio::spawn(async move {
                // Queued back to back, acknowledgements awaited at the end: the gateway's pattern.
                let mut acks = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let rec = conformance::record(Some(&format!("client-{t}")), &format!("m{i}"));
                    acks.push(core.enqueue(&topic, rec).await.unwrap());
                }
                for ack in acks {
                    ack.await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = (TASKS * PER_TASK) as f64;
    println!("rocketmq: {total} appends, {TASKS} keys, 4 queues, in {secs:.2}s = {:.0} appends/s", total / secs);
    core.shutdown().await;
}

/// A state topic that an operator created with several queues still gives one consistent view:
/// every change goes to, and is read from, its first queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_topic_with_several_queues() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let state_topic = format!("state_multi_{}", rocketmq_broker::run_id());
    let mut producer = rocketmq_broker::plain::producer(&namesrv).await;
    producer.create_topic("TBW102", &state_topic, 4, Default::default()).await.expect("create state topic");
    let config = RocketmqConfig { namesrv_addr: namesrv, state_topic, ..Default::default() };
    let core = RocketmqCore::open(&config, EVENTS).await.expect("open rocketmq core");
    for i in 0..12 {
        let key = format!("client-{i}");
        let value = bytes::Bytes::from(format!("session-{i}"));
        let put = core.put_state(lmq_gateway::backend::StateStore::Sessions, &key, Some(value.clone()));
        tokio::time::timeout(conformance::STEP_TIMEOUT, put).await.expect("put in time").expect("put");
        let got = core.get_state(lmq_gateway::backend::StateStore::Sessions, &key).await.expect("get");
        assert_eq!(got, Some(value));
    }
    core.shutdown().await;
}

/// A gateway keeps its copy of the state topic in `state_cache_dir`: restarted, it answers
/// local reads from the copy at once, and reads of changes other gateways made while it was
/// away wait until it has read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_copy_resumes_after_a_restart() {
    use bytes::Bytes;
    use lmq_gateway::backend::StateStore::{Credentials, Retained, Sessions};
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let state_topic = format!("state_copy_{}", rocketmq_broker::run_id());
    let cache = tempfile::tempdir().expect("temporary directory");
    let with_copy = RocketmqConfig {
        namesrv_addr: namesrv,
        state_topic,
        state_cache_dir: Some(cache.path().to_owned()),
        ..Default::default()
    };
    let without_copy = RocketmqConfig { state_cache_dir: None, ..with_copy.clone() };
    async fn put(core: Arc<RocketmqCore>, store: lmq_gateway::backend::StateStore, key: String, value: Option<&str>) {
        let put = core.put_state(store, &key, value.map(|v| Bytes::from(v.to_owned())));
        tokio::time::timeout(conformance::STEP_TIMEOUT, put).await.expect("put in time").expect("put");
    }

    let core = RocketmqCore::open(&with_copy, EVENTS).await.expect("open rocketmq core");
    for i in 0..50 {
        put(core.clone(), Sessions, format!("s{i:02}"), Some(&format!("v{i}"))).await;
    }
    put(core.clone(), Retained, "t/a".into(), Some("r")).await;
    put(core.clone(), Credentials, "ak".into(), Some("c")).await;
    core.shutdown().await;
    drop(core);

    // While it is away, another gateway changes the state.
    let other = RocketmqCore::open(&without_copy, EVENTS).await.expect("open rocketmq core");
    put(other.clone(), Sessions, "s00".into(), Some("changed")).await;
    put(other.clone(), Sessions, "s01".into(), None).await;
    put(other.clone(), Sessions, "s50".into(), Some("new")).await;
    other.shutdown().await;
    drop(other);

    let core = RocketmqCore::open(&with_copy, EVENTS).await.expect("reopen rocketmq core");
    let peeked = core.peek_state(Sessions, "s10").await.expect("peek");
    assert_eq!(peeked, Some(Bytes::from("v10")), "a local read answers from the copy right after the start");
    let get = |key: &str| core.get_state(Sessions, key);
    assert_eq!(get("s00").await.expect("get"), Some(Bytes::from("changed")));
    assert_eq!(get("s01").await.expect("get"), None);
    assert_eq!(get("s50").await.expect("get"), Some(Bytes::from("new")));
    let sessions = core.scan_state(Sessions, None, 1000).await.expect("scan");
    let keys: Vec<&str> = sessions.iter().map(|(k, _)| k.as_str()).collect();
    let mut expected: Vec<String> = (2..51).map(|i| format!("s{i:02}")).collect();
    expected.insert(0, "s00".into());
    assert_eq!(keys, expected, "sessions in key order, and nothing of the other stores");
    let retained = core.scan_state(Retained, None, 1000).await.expect("scan");
    assert_eq!(retained, vec![("t/a".to_owned(), Bytes::from("r"))]);
    let credential = core.get_state(Credentials, "ak").await.expect("get");
    assert_eq!(credential, Some(Bytes::from("c")));
    core.shutdown().await;
}
