//! The gateway on the Kafka core service, against Apache Kafka (KRaft, one node):
//! MQTT → Kafka records, Kafka → MQTT deliveries, two gateway processes sharing one cluster,
//! no acknowledged message lost when a gateway is killed or the broker stops, status events;
//! and the hostile-client checks of `tests/hostile` on Kafka (module `hostile_checks`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;
#[macro_use]
mod ops;
#[macro_use]
mod delay;
mod kafka_broker;

use common::{publish_pipelined, v4, v5, GatewayProcess, Pace, FULL_SPEED, WAIT};
use kafka_broker::KafkaBroker;
use lmq_gateway::config::Config;
use lmq_gateway::gateway::Gateway;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OPEN_AUTH: &str = "auth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n";

/// A gateway's configuration on `broker`, after its `listeners:` section.
fn gateway_yaml(broker: &KafkaBroker, gateway_id: &str) -> String {
    format!("gateway_id: {gateway_id}\n{}{OPEN_AUTH}", broker.core_yaml())
}

/// A gateway in this test process.
async fn gateway(broker: &KafkaBroker, gateway_id: &str) -> Gateway {
    let yaml = format!("listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}", gateway_yaml(broker, gateway_id));
    Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway on Kafka starts")
}

/// A gateway process (the real binary) on `broker`, killable with SIGKILL.
fn gateway_process(broker: &KafkaBroker, gateway_id: &str) -> GatewayProcess {
    GatewayProcess::start(&gateway_yaml(broker, gateway_id))
}

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer")
}

/// Every record of `topic` (all partitions, from the beginning) as a plain Kafka consumer
/// sees it: (partition, key, headers, payload).
type Seen = (i32, Option<Vec<u8>>, HashMap<String, Vec<u8>>, Vec<u8>);
fn read_topic(bootstrap: &str, topic: &str) -> Vec<Seen> {
    let c = consumer(bootstrap);
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("metadata");
    let partitions = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0) as i32;
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = c.fetch_watermarks(topic, p, Duration::from_secs(5)).expect("watermarks");
        if high > 0 {
            ends.insert(p, high);
            list.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    c.assign(&list).expect("assign");
    drop(list);
    let mut done: HashMap<i32, bool> = ends.keys().map(|p| (*p, false)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.values().any(|d| !d) {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
        let m = m.expect("consume");
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        out.push((m.partition(), m.key().map(<[u8]>::to_vec), headers, m.payload().unwrap_or_default().to_vec()));
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), true);
        }
    }
    out
}

fn producer(broker: &KafkaBroker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("message.timeout.ms", "10000")
        .create()
        .expect("test producer")
}

async fn produce(p: &FutureProducer, topic: &str, headers: &[(&str, &str)], payload: &str) {
    let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(*v) }));
    let rec: FutureRecord<'_, str, str> = FutureRecord::to(topic).payload(payload).headers(h);
    p.send(rec, Duration::from_secs(10)).await.expect("plain producer delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publishes_become_kafka_records_with_key_headers_and_payload() {
    let broker = kafka_broker::shared();
    let gw = gateway(broker, "gw-pub").await;
    let addr = gw.addr();
    let mut c = v4::connect(addr, "GID_k@@@pub-1").await;
    c.publish("kpub/dev1/temp", v4::QoS::AtMostOnce, false, b"q0").await;
    c.publish("kpub/dev1/temp", v4::QoS::AtLeastOnce, false, b"q1").await;
    c.publish("kpub/dev1/temp", v4::QoS::ExactlyOnce, false, b"q2").await;
    c.disconnect().await;
    let (mut c5, _) = v5::connect_with(v5::options(addr, "GID_k@@@pub-5")).await;
    let props = v5::PublishProperties {
        user_properties: vec![("region".into(), "eu".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    c5.client
        .publish_with_properties("kpub/dev2", v5::QoS::AtLeastOnce, false, "q1-v5", props)
        .await
        .expect("publish queued");
    c5.wait_for(|e| matches!(e, v5::Event::Incoming(v5::Packet::PubAck(_)))).await;
    c5.disconnect().await;
    gw.shutdown().await;

    let records =
        tokio::task::spawn_blocking(|| read_topic(&kafka_broker::shared().bootstrap(), "kpub")).await.unwrap();
    let by_payload: HashMap<&[u8], &Seen> = records.iter().map(|r| (&r.3[..], r)).collect();
    assert_eq!(records.len(), 4, "records: {records:?}");
    for (payload, qos) in [(&b"q0"[..], "0"), (b"q1", "1"), (b"q2", "2")] {
        let (_, key, headers, _) = by_payload.get(payload).unwrap_or_else(|| panic!("{payload:?} not in Kafka"));
        assert_eq!(key.as_deref(), Some(&b"GID_k@@@pub-1"[..]), "record key = ClientId");
        assert_eq!(headers["topic"], b"kpub/dev1/temp");
        assert_eq!(headers["mqttSecondTopic"], b"/dev1/temp");
        assert_eq!(headers["qoslevel"], qos.as_bytes());
        assert_eq!(headers["clientId"], b"GID_k@@@pub-1");
    }
    let (_, key, headers, _) = by_payload[&b"q1-v5"[..]];
    assert_eq!(key.as_deref(), Some(&b"GID_k@@@pub-5"[..]));
    assert_eq!(headers["topic"], b"kpub/dev2");
    assert_eq!(headers["mqtt5ContentType"], b"text/plain");
    let props: serde_json::Value = serde_json::from_slice(&headers["mqtt5UserProperty"]).expect("JSON user properties");
    assert_eq!(props, serde_json::json!([{"key": "region", "value": "eu"}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_reach_mqtt_subscribers_with_wildcards_and_p2p() {
    let broker = kafka_broker::shared();
    let gw = gateway(broker, "gw-sub").await;
    let addr = gw.addr();
    let mut wild = v4::connect(addr, "GID_k@@@wild").await;
    wild.subscribe("kc2d/+/cmd", v4::QoS::AtLeastOnce).await;
    let mut all = v4::connect(addr, "GID_k@@@all").await;
    all.subscribe("kc2d/#", v4::QoS::AtMostOnce).await;
    // A device with no subscription at all: P2P messages reach it by ClientId.
    let mut device = v4::connect(addr, "GID_k@@@dev9").await;

    let p = producer(broker);
    produce(&p, "kc2d", &[("mqttSecondTopic", "/dev1/cmd"), ("qoslevel", "1")], "from-kafka-1").await;
    produce(&p, "kc2d", &[("topic", "kc2d/dev2/cmd")], "from-kafka-2").await;
    produce(&p, "kc2d", &[("topic", "kc2d/p2p/GID_k@@@dev9"), ("qoslevel", "1")], "to-dev9").await;

    let mut got = BTreeSet::new();
    for _ in 0..2 {
        let m = wild.next_publish().await;
        got.insert((m.topic.clone(), String::from_utf8_lossy(&m.payload).into_owned()));
        assert_eq!(m.qos, v4::QoS::AtLeastOnce);
    }
    assert_eq!(
        got,
        BTreeSet::from([
            ("kc2d/dev1/cmd".to_owned(), "from-kafka-1".to_owned()),
            ("kc2d/dev2/cmd".to_owned(), "from-kafka-2".to_owned())
        ])
    );
    let mut got_all = BTreeSet::new();
    for _ in 0..2 {
        got_all.insert(all.next_publish().await.topic);
    }
    assert_eq!(got_all, BTreeSet::from(["kc2d/dev1/cmd".to_owned(), "kc2d/dev2/cmd".to_owned()]));
    let m = device.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("kc2d/p2p/GID_k@@@dev9", &b"to-dev9"[..]));
    // The P2P message went to its target only.
    assert!(wild.no_publish(Duration::from_millis(500)).await);
    assert!(all.no_publish(Duration::from_millis(100)).await);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_messages_retained_and_client_ids() {
    let broker = kafka_broker::shared();
    let a = gateway_process(broker, "gw-a");
    let b = gateway_process(broker, "gw-b");

    // Publish on A, receive on B.
    let mut sub_b = v4::connect(b.addr, "GID_k@@@sub-b").await;
    sub_b.subscribe("kshare/#", v4::QoS::AtLeastOnce).await;
    let mut pub_a = v4::connect(a.addr, "GID_k@@@pub-a").await;
    pub_a.publish("kshare/x", v4::QoS::AtLeastOnce, false, b"a-to-b").await;
    let m = sub_b.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("kshare/x", &b"a-to-b"[..]));

    // A retained message set through A is seen by a new subscriber on B.
    pub_a.publish("kshare/status", v4::QoS::AtLeastOnce, true, b"online").await;
    let _ = sub_b.next_publish().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let mut late = v4::connect(b.addr, "GID_k@@@late-b").await;
        late.subscribe("kshare/status", v4::QoS::AtLeastOnce).await;
        let seen = publish_within(&mut late, Duration::from_millis(500)).await;
        late.disconnect().await;
        if let Some(m) = seen {
            assert!(m.retain);
            assert_eq!(&m.payload[..], b"online");
            break;
        }
        assert!(Instant::now() < deadline, "retained message not seen on B");
    }

    // ClientId takeover across gateways: the newer connection on B closes the one on A.
    let mut dup_a = v4::connect(a.addr, "GID_k@@@twin").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _dup_b = v4::connect(b.addr, "GID_k@@@twin").await;
    dup_a.closed_by_server().await;
    pub_a.disconnect().await;

    // The test broker keeps one copy of each partition: the gateway says so at start.
    let log = a.log();
    assert!(
        log.contains("replication factor 1") && log.contains("lmq-sessions"),
        "no warning about single-copy topics in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_resumes_on_another_gateway_after_sigkill() {
    let broker = kafka_broker::shared();
    let mut a = gateway_process(broker, "gw-ka");
    let b = gateway_process(broker, "gw-kb");
    let mut opts = v4::options(a.addr, "GID_k@@@persistent");
    opts.set_clean_session(false);
    let mut dev = v4::connect_with(opts).await;
    dev.subscribe("kpersist/#", v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(b.addr, "GID_k@@@pub-persist").await;
    publisher.publish("kpersist/1", v4::QoS::AtLeastOnce, false, b"before").await;
    assert_eq!(&dev.next_publish().await.payload[..], b"before");
    // rumqttc acknowledged it; the session's position is saved at the next checkpoint (1 s).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    a.sigkill();
    dev.kill();

    let missed: Vec<String> = (0..10).map(|i| format!("missed-{i}")).collect();
    for m in &missed {
        publisher.publish("kpersist/2", v4::QoS::AtLeastOnce, false, m.as_bytes()).await;
    }
    let mut opts = v4::options(b.addr, "GID_k@@@persistent");
    opts.set_clean_session(false);
    let (client, mut eventloop) = v4::AsyncClient::new(opts, 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    let mut session_present = None;
    while got.len() < missed.len() {
        let ev = tokio::time::timeout_at(deadline, eventloop.poll()).await.expect("missed messages in time");
        match ev.expect("connection to B") {
            v4::Event::Incoming(v4::Packet::ConnAck(ack)) => session_present = Some(ack.session_present),
            v4::Event::Incoming(v4::Packet::Publish(p)) => got.push(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => {}
        }
    }
    assert_eq!(session_present, Some(true), "B found the session stored by A");
    assert_eq!(got, missed, "exactly the missed messages, in order, none acknowledged before");
    // Nothing more (in particular not `before` again).
    let extra = tokio::time::timeout(Duration::from_millis(800), async {
        loop {
            if let Ok(v4::Event::Incoming(v4::Packet::Publish(p))) = eventloop.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "unexpected redelivery: {:?}", extra.map(|p| p.payload));
    drop(client);
    publisher.disconnect().await;
}

/// Connect with clean_session=false (true with `clean`), subscribe to `filter` when given,
/// disconnect; the CONNACK's session-present flag.
async fn session_visit(addr: std::net::SocketAddr, client_id: &str, clean: bool, filter: Option<&str>) -> bool {
    let mut opts = v4::options(addr, client_id);
    opts.set_clean_session(clean);
    let (client, mut eventloop) = v4::AsyncClient::new(opts, 10);
    let present = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await.expect("CONNACK in time").expect("connected") {
            v4::Event::Incoming(v4::Packet::ConnAck(ack)) => break ack.session_present,
            _ => continue,
        }
    };
    if let Some(filter) = filter {
        client.subscribe(filter, v4::QoS::AtLeastOnce).await.expect("subscribe");
        loop {
            let ev = tokio::time::timeout(WAIT, eventloop.poll()).await.expect("SUBACK in time").expect("connected");
            if matches!(ev, v4::Event::Incoming(v4::Packet::SubAck(_))) {
                break;
            }
        }
    }
    client.disconnect().await.expect("disconnect");
    while let Ok(Ok(ev)) = tokio::time::timeout(WAIT, eventloop.poll()).await {
        if matches!(ev, v4::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    present
}

/// A gateway keeps its copy of the sessions store in `state_cache_dir`: restarted on it, it
/// continues from where the copy left off and sees what other gateways changed meanwhile —
/// a session created, a session ended — as well as what it knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_resumes_its_sessions_cache_and_sees_what_changed_meanwhile() {
    let broker = kafka_broker::shared();
    let cache = tempfile::tempdir().expect("cache dir");
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\ngateway_id: gw-cache-a\n{}    state_cache_dir: {}\n{OPEN_AUTH}",
        broker.core_yaml(),
        cache.path().display()
    );
    let a = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway");
    for id in ["GID_k@@@cache-kept", "GID_k@@@cache-ended"] {
        assert!(!session_visit(a.addr(), id, false, Some("kcache/#")).await, "{id} is new");
    }
    assert!(session_visit(a.addr(), "GID_k@@@cache-kept", false, None).await, "stored on A");
    // Retained messages, more than the retained index reads in one page at start.
    let mut retainer = v4::connect(a.addr(), "GID_k@@@cache-retainer").await;
    for i in 0..CACHE_RETAINED {
        let topic = format!("kcache/many/{}/{i:04}", i % 2);
        retainer.client.publish(topic, v4::QoS::AtLeastOnce, true, format!("r{i}").into_bytes()).await.expect("queued");
    }
    for _ in 0..CACHE_RETAINED {
        retainer.wait_for(|e| matches!(e, v4::Event::Incoming(v4::Incoming::PubAck(_)))).await;
    }
    retainer.disconnect().await;
    a.shutdown().await;
    assert!(cache.path().join("sessions/state.redb").exists(), "the copy is in the configured directory");
    assert!(cache.path().join("retained/state.redb").exists(), "retained messages are copied too");

    // Meanwhile, on another gateway: a new persistent session, and one ended by a clean start.
    let b = gateway(broker, "gw-cache-b").await;
    assert!(!session_visit(b.addr(), "GID_k@@@cache-new", false, Some("kcache/#")).await);
    // A clean start ends the stored session (its CONNACK says no session, [MQTT-3.2.2-1]).
    assert!(!session_visit(b.addr(), "GID_k@@@cache-ended", true, None).await);
    let mut retainer = v4::connect(b.addr(), "GID_k@@@cache-retainer").await;
    retainer.publish("kcache/many/0/0000", v4::QoS::AtLeastOnce, true, b"changed").await;
    retainer.publish("kcache/many/1/0001", v4::QoS::AtLeastOnce, true, b"").await;
    retainer.disconnect().await;
    b.shutdown().await;

    let a = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway restarts on its cache");
    assert!(session_visit(a.addr(), "GID_k@@@cache-kept", false, None).await, "known before the restart");
    assert!(session_visit(a.addr(), "GID_k@@@cache-new", false, None).await, "created elsewhere meanwhile");
    assert!(!session_visit(a.addr(), "GID_k@@@cache-ended", false, None).await, "ended elsewhere meanwhile");
    a.shutdown().await;

    // The same retained messages right after a start, on the local copy and without one.
    for copy in ["warm", "cold"] {
        if copy == "cold" {
            std::fs::remove_dir_all(cache.path().join("retained")).expect("copy removed");
        }
        let a = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway");
        let even = retained_under(a.addr(), "kcache/many/0/#").await;
        assert_eq!(even.len(), CACHE_RETAINED / 2, "{copy}: every retained message of the first filter");
        assert_eq!(even.get("kcache/many/0/0000").map(Vec::as_slice), Some(&b"changed"[..]), "{copy}");
        assert_eq!(even.get("kcache/many/0/0002").map(Vec::as_slice), Some(&b"r2"[..]), "{copy}");
        let odd = retained_under(a.addr(), "kcache/many/1/#").await;
        assert_eq!(odd.len(), CACHE_RETAINED / 2 - 1, "{copy}: the one cleared meanwhile is gone");
        assert!(!odd.contains_key("kcache/many/1/0001"), "{copy}");
        a.shutdown().await;
    }
}

/// Retained messages of the cache test: more than one page of the retained index at start
/// (1,000), half of them (one filter's share) fewer than a SUBSCRIBE's cap (1,000).
const CACHE_RETAINED: usize = 1_100;

/// The retained messages a new subscriber of `filter` gets: topic → payload.
async fn retained_under(addr: std::net::SocketAddr, filter: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut sub = v4::connect(addr, "GID_k@@@cache-reader").await;
    sub.subscribe(filter, v4::QoS::AtLeastOnce).await;
    let mut seen = std::collections::BTreeMap::new();
    while let Some(m) = publish_within(&mut sub, Duration::from_secs(2)).await {
        assert!(m.retain, "{} is a retained message", m.topic);
        seen.insert(m.topic.clone(), m.payload.to_vec());
    }
    sub.disconnect().await;
    seen
}

fn assert_all_in_kafka(bootstrap: &str, topic: &str, acked: &BTreeSet<u32>) {
    let stored: BTreeSet<u32> = read_topic(bootstrap, topic)
        .into_iter()
        .filter_map(|(_, _, _, payload)| String::from_utf8(payload).ok()?.parse().ok())
        .collect();
    let lost: Vec<&u32> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages are not in Kafka, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_lost_when_the_gateway_is_killed() {
    const TOTAL: u32 = 20_000;
    let broker = kafka_broker::shared();
    let mut gw = gateway_process(broker, "gw-kill");
    let addr = gw.addr;
    let mut acked = BTreeSet::new();
    // Killed once a quarter of the messages are acknowledged: mid-stream however fast the
    // broker is.
    let progress = Arc::new(AtomicUsize::new(0));
    let seen = progress.clone();
    let killer = tokio::spawn(async move {
        while seen.load(Ordering::Relaxed) < TOTAL as usize / 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        gw.sigkill();
        gw
    });
    let mut next =
        publish_pipelined(addr, "GID_k@@@loss", "kloss/a", 0, TOTAL, FULL_SPEED, &mut acked, &progress).await;
    let killed_at = acked.len();
    drop(killer.await.expect("killer"));
    assert!(next < TOTAL, "the gateway was killed mid-stream ({killed_at} acknowledged before)");
    let gw = gateway_process(broker, "gw-kill");
    let deadline = Instant::now() + Duration::from_secs(300);
    while next < TOTAL {
        assert!(Instant::now() < deadline, "publishing did not finish");
        next =
            publish_pipelined(gw.addr, "GID_k@@@loss", "kloss/a", next, TOTAL, FULL_SPEED, &mut acked, &progress).await;
    }
    assert!(acked.len() as u32 >= TOTAL - 200, "only {} of {TOTAL} acknowledged", acked.len());
    let acked2 = acked.clone();
    tokio::task::spawn_blocking(move || assert_all_in_kafka(&kafka_broker::shared().bootstrap(), "kloss", &acked2))
        .await
        .expect("check");
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_lost_while_the_broker_stops_for_20_seconds() {
    const TOTAL: u32 = 20_000;
    // The outage is a real stop of the broker process and a restart on the same data.
    // The gateway's log is shown when this test fails.
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    let owned = kafka_broker::OwnedBroker::start();
    let broker = owned.broker();
    let gw = gateway(broker, "gw-outage").await;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let (restarted_tx, restarted_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = gw.addr();
    let mut acked = BTreeSet::new();
    let progress = AtomicUsize::new(0);
    // At 1,000 msg/s the 20,000 messages take 20 s without the outage: it starts mid-stream.
    let pace = Pace { window: 200, rate: Some(1000.0) };
    let outage = async {
        while progress.load(Ordering::Relaxed) < 2_000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        owned.stop().await;
        let _ = stopped_tx.send(());
        // Nothing is acknowledged while the broker is down (what was in flight when it
        // stopped has had 2 s to be answered).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = progress.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(18)).await;
        let during = progress.load(Ordering::Relaxed);
        assert_eq!(during, before, "messages acknowledged while the broker was down");
        assert!(during < TOTAL as usize, "the outage came after the last message");
        owned.restart().await;
        let _ = restarted_tx.send(());
    };
    let publisher = async {
        let mut next = 0;
        let deadline = Instant::now() + Duration::from_secs(180);
        while next < TOTAL {
            assert!(Instant::now() < deadline, "publishing did not finish");
            next =
                publish_pipelined(addr, "GID_k@@@outage", "koutage/a", next, TOTAL, pace, &mut acked, &progress).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let watcher = async {
        let _ = stopped_rx.await;
        // While the broker is down the gateway says so, and keeps running.
        let deadline = Instant::now() + Duration::from_secs(15);
        while gw.ctx.backend.is_available() {
            assert!(Instant::now() < deadline, "core service still reported available with the broker down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        restarted_rx.await.expect("broker restarted");
    };
    let ((), (), ()) = tokio::join!(publisher, watcher, outage);
    // The availability probe runs every 2 s: it sees the broker back within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gw.ctx.backend.is_available() {
        assert!(Instant::now() < deadline, "not available again 15 s after the broker came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(acked.len() as u32, TOTAL, "every message acknowledged in the end");
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || assert_all_in_kafka(&bootstrap, "koutage", &acked)).await.expect("check");
    gw.shutdown().await;
    drop(owned);
}

/// A broker refuses a request now and then with a retriable error — the first request to a
/// partition it has just created and does not lead yet, on a busy machine — and may store the
/// producer's next batch of that partition meanwhile: holding no sequence state for the
/// producer there, it accepts a batch that does not start at sequence 0. The refused records
/// are then not in the log, although the Kafka client takes the later success for their
/// delivery too. They must not be acknowledged: the publisher sends them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_message_lost_when_a_new_partition_refuses_its_first_batch() {
    const TOTAL: u32 = 500;
    let mut proxy = kafka_broker::FaultProxy::bind().await;
    proxy.refuse_first_produce_to("kfirst");
    let owned = kafka_broker::OwnedBroker::start_behind(Some(proxy.port));
    proxy.forward_to(owned.broker().port);
    let broker = owned.broker();
    // Batches of two messages: those queued behind the first batch go out in the next ones
    // while it is on its way, as with a steady stream of messages.
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}    librdkafka:\n      batch.num.messages: \"2\"\n\
         {OPEN_AUTH}gateway_id: gw-first\n",
        broker.core_yaml()
    );
    let gw = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway on Kafka starts");
    let mut acked = BTreeSet::new();
    let progress = AtomicUsize::new(0);
    let pace = Pace { window: 200, rate: Some(1000.0) };
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < TOTAL {
        assert!(Instant::now() < deadline, "publishing did not finish");
        next =
            publish_pipelined(gw.addr(), "GID_k@@@first", "kfirst/a", next, TOTAL, pace, &mut acked, &progress).await;
    }
    assert!(proxy.refused(), "the first batch to the new partition was refused");
    assert_eq!(acked.len() as u32, TOTAL, "every message acknowledged in the end");
    let bootstrap = broker.bootstrap();
    tokio::task::spawn_blocking(move || assert_all_in_kafka(&bootstrap, "kfirst", &acked)).await.expect("check");
    gw.shutdown().await;
    drop(owned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_for_each_way_a_connection_ends() {
    let broker = kafka_broker::shared();
    let gw = gateway(broker, "gw-events").await;
    let addr = gw.addr();
    let clean = v4::connect(addr, "GID_k@@@ev-clean").await;
    clean.disconnect().await;
    let abrupt = v4::connect(addr, "GID_k@@@ev-abrupt").await;
    abrupt.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.shutdown().await;

    let events = tokio::task::spawn_blocking(|| read_topic(&kafka_broker::shared().bootstrap(), "GID_LMQ_STATUS"))
        .await
        .unwrap();
    let of = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|(_, key, _, _)| key.as_deref() == Some(id.as_bytes()))
            .map(|(_, _, headers, body)| {
                let body: serde_json::Value = serde_json::from_slice(body).expect("LMQ JSON body");
                let t = String::from_utf8_lossy(&headers["eventType"]).into_owned();
                assert_eq!(body["eventType"], t.as_str());
                assert_eq!(body["clientId"], id);
                assert!(body["channelId"].is_string() && body["clientIp"].is_string() && body["time"].is_i64());
                t
            })
            .collect()
    };
    assert_eq!(of("GID_k@@@ev-clean"), ["connect", "disconnect", "tcpclean"]);
    assert_eq!(of("GID_k@@@ev-abrupt"), ["connect", "tcpclean"]);
}

/// The next PUBLISH within `d`, if any.
async fn publish_within(c: &mut v4::Client, d: Duration) -> Option<v4::Publish> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Incoming::Publish(p))))) => return Some(p),
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_spreads_over_gateways_through_a_consumer_group() {
    let broker = kafka_broker::shared();
    let a = gateway(broker, "gw-share-a").await;
    let b = gateway(broker, "gw-share-b").await;
    let mut member_a = v4::connect(a.addr(), "GID_k@@@member-a").await;
    member_a.subscribe("$share/workers/kgroup/#", v4::QoS::AtLeastOnce).await;
    let mut member_b = v4::connect(b.addr(), "GID_k@@@member-b").await;
    member_b.subscribe("$share/workers/kgroup/#", v4::QoS::AtLeastOnce).await;
    // Publishers with different ClientIds (the record key), so records spread over partitions.
    let mut publishers = Vec::new();
    for i in 0..8 {
        publishers.push(v4::connect(a.addr(), &format!("GID_k@@@shpub-{i}")).await);
    }

    // Warm-up until the group has formed and split the partitions: both members receive.
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    while got_a.is_empty() || got_b.is_empty() {
        assert!(Instant::now() < deadline, "the group never split: a got {got_a:?}, b got {got_b:?}");
        for (i, p) in publishers.iter_mut().enumerate() {
            p.publish("kgroup/w", v4::QoS::AtLeastOnce, false, format!("warm-{round}-{i}").as_bytes()).await;
        }
        round += 1;
        if let Some(m) = publish_within(&mut member_a, Duration::from_millis(300)).await {
            got_a.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
        if let Some(m) = publish_within(&mut member_b, Duration::from_millis(300)).await {
            got_b.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }

    // Then every message reaches exactly one member of the group, over both gateways.
    let sent: BTreeSet<String> = (0..40).map(|i| format!("m-{i}")).collect();
    for (i, m) in sent.iter().enumerate() {
        publishers[i % 8].publish("kgroup/job", v4::QoS::AtLeastOnce, false, m.as_bytes()).await;
    }
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < sent.len() && Instant::now() < deadline {
        for member in [&mut member_a, &mut member_b] {
            while let Some(m) = publish_within(member, Duration::from_millis(100)).await {
                let p = String::from_utf8_lossy(&m.payload).into_owned();
                if p.starts_with("m-") {
                    seen.push(p);
                }
            }
        }
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a message reached the group twice: {seen:?}");
    assert_eq!(unique, sent, "every message reaches the group");
    a.shutdown().await;
    b.shutdown().await;
}

/// Issue 13: with parent `*`, every first topic level maps to a Kafka topic — but never to the
/// gateway's own. Subscribing and publishing to the state topics, the events topic and
/// Kafka's internal topics is refused, and nothing a device sent reaches those topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_reach_internal_topics() {
    let broker = kafka_broker::shared();
    let gw = gateway(broker, "gw-hostile").await;
    let internal = ["lmq-credentials", "lmq-sessions", "lmq-retained", "lmq-revoked-tokens", "GID_LMQ_STATUS"];
    for topic in internal.iter().chain(&["__consumer_offsets"]) {
        common::assert_topic_unreachable(gw.addr(), topic, |_| None).await;
    }
    // Ordinary topics still work for the same client.
    let mut ok = v4::connect(gw.addr(), "GID_k@@@ordinary").await;
    ok.publish("khostile/x", v4::QoS::AtLeastOnce, false, b"device-bytes-ok").await;
    ok.disconnect().await;
    gw.shutdown().await;

    let bootstrap = broker.bootstrap();
    let leaked = tokio::task::spawn_blocking(move || {
        let mut leaked = Vec::new();
        for topic in internal {
            for (_, _, _, payload) in read_topic(&bootstrap, topic) {
                if payload.starts_with(b"device-bytes") {
                    leaked.push((topic, String::from_utf8_lossy(&payload).into_owned()));
                }
            }
        }
        let ordinary = read_topic(&bootstrap, "khostile");
        (leaked, ordinary.iter().any(|r| r.3 == b"device-bytes-ok"))
    })
    .await
    .unwrap();
    assert_eq!(leaked.0, Vec::<(&str, String)>::new(), "device records in internal topics");
    assert!(leaked.1, "the ordinary publish reached Kafka (the check reads what it should)");
}

/// Cross-gateway takeover acts only on events gateways wrote: a `connect` event for a
/// connected ClientId produced into the events topic by a plain Kafka producer, without the
/// gateway marker header, kicks no one; the same event with the marker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmarked_events_from_plain_producers_take_nobody_over() {
    let broker = kafka_broker::shared();
    let gw = gateway(broker, "gw-marker").await;
    let mut victim = v4::connect(gw.addr(), "GID_k@@@marker-victim").await;
    victim.subscribe("kmarker/victim", v4::QoS::AtLeastOnce).await;
    // Let the takeover follower reach the end of the events topic.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forged = serde_json::json!({
        "eventType": "connect",
        "clientId": "GID_k@@@marker-victim",
        "channelId": "elsewhere",
        "clientIp": "10.0.0.9",
        "time": lmq_gateway::now_ms() + 60_000,
        "gatewayId": "gw-elsewhere",
    })
    .to_string();
    let p = producer(broker);
    produce(&p, "GID_LMQ_STATUS", &[("eventType", "connect")], &forged).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sender = v4::connect(gw.addr(), "GID_k@@@marker-sender").await;
    sender.publish("kmarker/victim", v4::QoS::AtLeastOnce, false, b"still-connected").await;
    assert_eq!(&victim.next_publish().await.payload[..], b"still-connected");
    assert!(gw.ctx.registry.get("GID_k@@@marker-victim").is_some(), "the unmarked event kicked the client");
    // With the marker (what a gateway writes), the takeover happens: the check above could fail.
    produce(&p, "GID_LMQ_STATUS", &[("eventType", "connect"), ("lmqGateway", "gw-elsewhere")], &forged).await;
    victim.closed_by_server().await;
    sender.disconnect().await;
    gw.shutdown().await;
}

/// A Kafka application schedules a message by writing it to the lowest delay level with the
/// documented headers (`topic`, `__STARTDELIVERTIME`): MQTT subscribers get it at that time,
/// not before. (Its own reserved prefix keeps the lease and levels apart from other checks on
/// the shared broker.) The delay topics are created with `delay.retention_hours`, and the gateway
/// that forwards hands forwarding on at once when it shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_schedule_delayed_messages_through_the_delay_topic() {
    // Timed like the delayed-message checks: one at a time with them.
    let _turn = delay::serial().await;
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let broker = kafka_broker::shared();
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}delay:\n  lease_ms: 2000\n  retention_hours: 100\n\
         topics:\n  reserved_prefix: kapp-\n",
        gateway_yaml(broker, "gw-delay-a")
    );
    let a = Gateway::start(Config::from_yaml(&yaml).unwrap()).await.unwrap();
    let forwarding = |gw: &Gateway| gw.ctx.metrics.delay.holder.get() == 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !forwarding(&a) {
        assert!(Instant::now() < deadline, "nobody forwards delayed messages");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = Gateway::start(Config::from_yaml(&yaml.replace("gw-delay-a", "gw-delay-b")).unwrap()).await.unwrap();
    let mut sub = v4::connect(b.addr(), "GID_k@@@delay-sub").await;
    sub.subscribe("kdelay/app", v4::QoS::AtLeastOnce).await;
    let due = lmq_gateway::now_ms() + 2_000;
    produce(
        &producer(broker),
        "kapp-delay-07",
        &[("topic", "kdelay/app"), ("qoslevel", "1"), ("__STARTDELIVERTIME", &due.to_string())],
        "from-kafka",
    )
    .await;
    let got = sub.next_publish().await;
    let at = lmq_gateway::now_ms();
    assert_eq!(&got.payload[..], b"from-kafka");
    assert!(at >= due, "delivered {} ms early", due - at);
    assert!(at <= due + 1_000, "delivered {} ms late", at - due);
    // The delay topics keep records for delay.retention_hours.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().expect("admin client");
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic("kapp-delay-07")], &AdminOptions::new())
        .await
        .expect("describe configs");
    let config = described.into_iter().next().expect("one resource").expect("topic config");
    let retention = config.get("retention.ms").and_then(|e| e.value.clone());
    let retention: u64 = retention.and_then(|r| r.parse().ok()).expect("delay topics have a retention");
    assert!(retention >= 100 * 3_600_000, "retention.ms {retention} below delay.retention_hours");
    // The forwarding gateway stops gracefully: the other takes over within a second or two,
    // not after the lease runs out.
    let stopped = Instant::now();
    a.shutdown().await;
    while !forwarding(&b) {
        assert!(stopped.elapsed() < Duration::from_secs(30), "forwarding was not handed on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let due = lmq_gateway::now_ms() + 1_000;
    produce(
        &producer(broker),
        "kapp-delay-07",
        &[("topic", "kdelay/app"), ("__STARTDELIVERTIME", &due.to_string())],
        "after-handover",
    )
    .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"after-handover");
    assert!(lmq_gateway::now_ms() >= due);
    sub.disconnect().await;
    b.shutdown().await;
}

/// A delayed message its topic refuses for good (larger than the topic's `max.message.bytes`)
/// is dropped and counted (`lmq_delayed_dropped_total{reason="rejected"}`), and the delayed
/// messages behind it in the same partition of the level still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_its_topic_refuses_is_dropped_and_the_level_goes_on() {
    let _turn = delay::serial().await;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let broker = kafka_broker::shared();
    let small = hostile::unique("ksmall");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(&small, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "1024")],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    // One partition per level: the refused message and the next one wait in the same queue.
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}delay:\n  lease_ms: 2000\n  partitions: 1\n\
         topics:\n  reserved_prefix: {}\n",
        gateway_yaml(broker, "gw-delay-rejected"),
        hostile::unique("krej")
    );
    let gw = Gateway::start(Config::from_yaml(&yaml).unwrap()).await.unwrap();
    delay::wait_forwarding(&gw).await;
    let mut sub = v4::connect(gw.addr(), "GID_k@@@rej-sub").await;
    sub.subscribe(&format!("{small}/#"), v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(gw.addr(), "GID_k@@@rej-pub").await;
    // Incompressible, so that no compression brings it under the topic's limit.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    publisher.publish(&format!("$delayed/1/{small}/big"), v4::QoS::AtLeastOnce, false, &big).await;
    publisher.publish(&format!("$delayed/1/{small}/ok"), v4::QoS::AtLeastOnce, false, b"after").await;
    let got = sub.next_publish().await;
    assert_eq!((got.topic.as_str(), got.payload.len()), (format!("{small}/ok").as_str(), 5), "the next message");
    let dropped = gw.ctx.metrics.delay.dropped.with_label_values(&["rejected"]).get();
    assert_eq!(dropped, 1, "the refused delayed message is counted once");
    publisher.disconnect().await;
    sub.disconnect().await;
    gw.shutdown().await;
}

/// The trace topic is created with its own retention (`trace.retention_hours` → `retention.ms`)
/// and receives the events of a traced message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_topic_is_created_with_its_own_retention() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let broker = kafka_broker::shared();
    let topic = hostile::unique("lmq-trace-t");
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}trace:\n  enabled: true\n  topic: {topic}\n  retention_hours: 5\n",
        gateway_yaml(broker, "gw-trace")
    );
    let gw = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway");
    let mut c = v4::connect(gw.addr(), "trace-retention").await;
    c.publish("traced/t", v4::QoS::AtLeastOnce, false, b"x").await;
    // The gateway's writer creates the topic with the first events.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let partitions = gw.ctx.backend.partitions(&topic).unwrap_or(0);
        let mut stored = 0;
        for p in 0..partitions {
            let tp = lmq_gateway::backend::TopicPartition::new(topic.as_str(), p);
            stored += gw.ctx.backend.end_offset(&tp).await.unwrap_or(0);
        }
        if stored > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no trace events in {topic}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", broker.bootstrap()).create().expect("admin client");
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let config = described.into_iter().next().expect("one resource").expect("topic config");
    let retention = config.get("retention.ms").and_then(|e| e.value.clone());
    assert_eq!(retention.as_deref(), Some("18000000"));
    c.disconnect().await;
    gw.shutdown().await;
}

/// The hostile-client checks (`tests/hostile`) with sessions, offline messages, credentials
/// and events in Kafka, and Kafka's own topics among the reserved names.
macro_rules! on_kafka {
    ($module:ident; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            crate::$module::$name(&crate::hostile::Core::kafka(crate::kafka_broker::shared().core_yaml())).await;
        }
    )*};
}

mod hostile_checks {
    for_each_session_check!(on_kafka);
    for_each_namespace_check!(on_kafka);
    for_each_crash_check!(on_kafka);

    for_each_bounds_check!(on_kafka);
}

mod ops_checks {
    for_each_ops_check!(on_kafka);
    for_each_cluster_ops_check!(on_kafka);
}

mod delay_checks {
    for_each_delay_check!(on_kafka);
    for_each_delay_crash_check!(on_kafka);
    for_each_cluster_delay_check!(on_kafka);
}
