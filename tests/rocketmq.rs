//! The gateway on the RocketMQ core service, against a real broker (see `tests/rocketmq_broker`):
//! what plain RocketMQ applications see of MQTT traffic and status events, what MQTT clients
//! receive from plain RocketMQ producers, and two gateway processes sharing one cluster; and
//! the hostile-client checks of `tests/hostile` on RocketMQ (module `hostile_checks`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;
#[macro_use]
mod ops;
#[macro_use]
mod delay;
mod rocketmq_broker;

use common::{v4, v5, GatewayProcess, WAIT};
use lmq_gateway::config::Config;
use lmq_gateway::gateway::Gateway;
use rocketmq_broker::plain;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::common::message::MessageTrait;
use std::collections::HashMap;
use std::time::Duration;

/// Configuration of a gateway on the test broker with `parent` declared, after its
/// `listeners:` section.
fn yaml_after_listeners(namesrv: &str, parent: &str, gateway_id: &str) -> String {
    format!(
        "gateway_id: {gateway_id}\ncore:\n  kind: rocketmq\n  rocketmq:\n    namesrv_addr: \"{namesrv}\"\ntopics:\n  parents:\n    - name: {parent}\nauth:\n  allow_anonymous: true\n  allow_plain_client_ids: true\n"
    )
}

/// The whole configuration of a gateway on the test broker listening on 127.0.0.1:0.
fn yaml(namesrv: &str, parent: &str, gateway_id: &str) -> String {
    format!("listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\n{}", yaml_after_listeners(namesrv, parent, gateway_id))
}

async fn gateway(namesrv: &str, parent: &str, id: &str) -> Gateway {
    let config = Config::from_yaml(&yaml(namesrv, parent, id)).expect("config");
    Gateway::start(config).await.expect("gateway on rocketmq starts")
}

fn parent(name: &str) -> String {
    format!("{name}{}", rocketmq_broker::run_id())
}

fn prop(m: &rocketmq_model::common::message::message_ext::MessageExt, name: &str) -> Option<String> {
    m.message_inner().property(name).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_reaches_plain_consumer_with_properties_and_tag() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let parent = parent("up");
    let gw = gateway(&namesrv, &parent, "gw-up").await;
    let mut tagged = plain::Reader::at_end(&namesrv, &parent, "room1").await;
    let mut all = plain::Reader::at_end(&namesrv, &parent, "*").await;

    let mut publisher = v5::connect(gw.addr(), "GID_up@@@pub1").await;
    let props =
        v5::PublishProperties { user_properties: vec![("unit".into(), "celsius".into())], ..Default::default() };
    publisher
        .client
        .publish_with_properties(format!("{parent}/room1/temp"), v5::QoS::AtLeastOnce, false, "21.5", props)
        .await
        .unwrap();
    publisher.wait_for(|e| matches!(e, v5::Event::Incoming(v5::Packet::PubAck(_)))).await;
    publisher.client.publish(format!("{parent}/room2/temp"), v5::QoS::AtLeastOnce, false, "19.0").await.unwrap();
    publisher.wait_for(|e| matches!(e, v5::Event::Incoming(v5::Packet::PubAck(_)))).await;

    // The tag filter `room1` sees the first message only.
    let got = tagged.read(1, WAIT).await;
    assert_eq!(got.len(), 1, "tag-filtered consumer got {got:?}");
    let m = &got[0];
    assert_eq!(m.body().as_deref(), Some(&b"21.5"[..]));
    assert_eq!(m.message_inner().tags(), Some("room1"));
    assert_eq!(prop(m, "topic").as_deref(), Some(format!("{parent}/room1/temp").as_str()));
    assert_eq!(prop(m, "mqttSecondTopic").as_deref(), Some("/room1/temp"));
    assert_eq!(prop(m, "qoslevel").as_deref(), Some("1"));
    assert_eq!(prop(m, "clientId").as_deref(), Some("GID_up@@@pub1"));
    assert_eq!(prop(m, "KEYS").as_deref(), Some("GID_up@@@pub1"));
    let user: serde_json::Value =
        serde_json::from_str(&prop(m, "mqtt5UserProperty").expect("mqtt5UserProperty")).unwrap();
    assert_eq!(user, serde_json::json!([{"key": "unit", "value": "celsius"}]));

    // `*` sees both, each tagged with its second level.
    let got = all.read(2, WAIT).await;
    let mut tags: Vec<_> = got.iter().map(|m| m.message_inner().tags().unwrap_or_default().to_owned()).collect();
    tags.sort();
    assert_eq!(tags, ["room1", "room2"]);
    publisher.disconnect().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_producer_reaches_mqtt_subscribers_with_wildcards_and_p2p() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let parent = parent("down");
    let gw = gateway(&namesrv, &parent, "gw-down").await;
    let mut plus = v4::connect(gw.addr(), "GID_down@@@plus").await;
    plus.subscribe(&format!("{parent}/+/temp"), v4::QoS::AtLeastOnce).await;
    let mut hash = v4::connect(gw.addr(), "GID_down@@@hash").await;
    hash.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let mut target = v4::connect(gw.addr(), "GID_down@@@target").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let producer = plain::producer(&namesrv).await;
    // By `mqttSecondTopic`, as LMQ applications send cloud-to-device messages.
    let mut m = Message::builder().topic(parent.as_str()).tags("room2").body_slice(b"from-app").build_unchecked();
    m.put_property("mqttSecondTopic".into(), "/room2/temp".into());
    m.put_property("qoslevel".into(), "1".into());
    producer.send_with_timeout(m, 5000).await.expect("plain send");
    for c in [&mut plus, &mut hash] {
        let p = c.next_publish().await;
        assert_eq!(p.topic, format!("{parent}/room2/temp"));
        assert_eq!(&p.payload[..], b"from-app");
        assert_eq!(p.qos, v4::QoS::AtLeastOnce);
    }
    // Without any property: the parent topic itself (matched by `#` only).
    let m = Message::builder().topic(parent.as_str()).body_slice(b"bare").build_unchecked();
    producer.send_with_timeout(m, 5000).await.expect("plain send");
    let p = hash.next_publish().await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), (parent.as_str(), &b"bare"[..]));

    // P2P by the `topic` property: only the target, which has no subscription.
    let mut m = Message::builder().topic(parent.as_str()).body_slice(b"for-you").build_unchecked();
    m.put_property("topic".into(), format!("{parent}/p2p/GID_down@@@target").into());
    producer.send_with_timeout(m, 5000).await.expect("plain send");
    let p = target.next_publish().await;
    assert_eq!(&p.payload[..], b"for-you");
    assert!(plus.no_publish(Duration::from_millis(700)).await);
    assert!(hash.no_publish(Duration::from_millis(100)).await);

    for c in [plus, hash, target] {
        c.disconnect().await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_for_tag_filter_connect_or_tcpclean() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let parent = parent("ev");
    let gw = gateway(&namesrv, &parent, "gw-events").await;
    let mut filtered = plain::Reader::at_end(&namesrv, "GID_LMQ_STATUS", "connect||tcpclean").await;
    let mut all = plain::Reader::at_end(&namesrv, "GID_LMQ_STATUS", "*").await;
    let clean_id = format!("GID_ev@@@clean{}", rocketmq_broker::run_id());
    let abrupt_id = format!("GID_ev@@@abrupt{}", rocketmq_broker::run_id());

    let clean = v4::connect(gw.addr(), &clean_id).await;
    clean.disconnect().await;
    let abrupt = v4::connect(gw.addr(), &abrupt_id).await;
    abrupt.kill();

    let mine = |msgs: Vec<rocketmq_model::common::message::message_ext::MessageExt>| {
        let mut per_client: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for m in msgs {
            let body: serde_json::Value = serde_json::from_slice(&m.body().unwrap_or_default()).expect("JSON body");
            let client = body["clientId"].as_str().unwrap_or_default().to_owned();
            if client == clean_id || client == abrupt_id {
                assert_eq!(prop(&m, "KEYS").as_deref(), Some(client.as_str()));
                assert_eq!(body["gatewayId"], "gw-events");
                assert!(body["channelId"].is_string() && body["clientIp"] == "127.0.0.1" && body["time"].is_i64());
                let tag = m.message_inner().tags().unwrap_or_default().to_owned();
                assert_eq!(body["eventType"].as_str(), Some(tag.as_str()), "tag = eventType");
                per_client.entry(client).or_default().push((tag, body["channelId"].as_str().unwrap_or("").into()));
            }
        }
        per_client
    };
    let tags = |v: &Vec<(String, String)>| v.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>();

    let got = mine(filtered.read(4, Duration::from_secs(10)).await);
    assert_eq!(tags(&got[&clean_id]), ["connect", "tcpclean"]);
    assert_eq!(tags(&got[&abrupt_id]), ["connect", "tcpclean"]);
    // One channel per connection, on both of its events.
    assert_eq!(got[&clean_id][0].1, got[&clean_id][1].1);
    // Unfiltered, the clean disconnect also shows its `disconnect`.
    let got = mine(all.read(5, Duration::from_secs(10)).await);
    assert_eq!(tags(&got[&clean_id]), ["connect", "disconnect", "tcpclean"]);
    assert_eq!(tags(&got[&abrupt_id]), ["connect", "tcpclean"]);
    // Nothing more arrives for them.
    assert!(mine(filtered.read(1, Duration::from_millis(500)).await).is_empty());
    gw.shutdown().await;
}

/// A gateway process (the built binary) on the test broker, killable with SIGKILL.
fn gateway_process(namesrv: &str, parent: &str, id: &str) -> GatewayProcess {
    GatewayProcess::options(&yaml_after_listeners(namesrv, parent, id)).env("RUST_LOG", "warn").start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_share_messages_and_sessions() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let parent = parent("two");
    let id = |name: &str| format!("GID_two@@@{name}{}", rocketmq_broker::run_id());
    let mut a = gateway_process(&namesrv, &parent, "gw-a");
    let b = gateway_process(&namesrv, &parent, "gw-b");

    // Cross-gateway delivery: published on A, received on B.
    let mut sub_b = v4::connect(b.addr, &id("subB")).await;
    sub_b.subscribe(&format!("{parent}/x/#"), v4::QoS::AtLeastOnce).await;
    let mut pub_a = v4::connect(a.addr, &id("pubA")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..10 {
        pub_a.publish(&format!("{parent}/x/{i}"), v4::QoS::AtLeastOnce, false, format!("m{i}").as_bytes()).await;
    }
    for i in 0..10 {
        let p = sub_b.next_publish().await;
        assert_eq!((p.topic, &p.payload[..]), (format!("{parent}/x/{i}"), format!("m{i}").as_bytes()));
    }

    // A persistent session on A; A is killed; the client resumes on B and gets every message
    // acknowledged to publishers meanwhile, and none it had acknowledged before.
    let mut opts = v4::options(a.addr, &id("durable"));
    opts.set_clean_session(false);
    let mut durable = v4::connect_with(opts).await;
    durable.subscribe(&format!("{parent}/s/#"), v4::QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pub_a.publish(&format!("{parent}/s/before"), v4::QoS::AtLeastOnce, false, b"before").await;
    let p = durable.next_publish().await;
    assert_eq!(&p.payload[..], b"before");
    pub_a.publish(&format!("{parent}/r/state"), v4::QoS::AtLeastOnce, true, b"on").await;
    // Let the gateway store the acknowledged position (at the next checkpoint, 1 s).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // Messages PUBACKed by A right up to its SIGKILL are all in RocketMQ.
    let mut reader = plain::Reader::at_end(&namesrv, &parent, "k").await;
    let mut acked_by_a = Vec::new();
    for i in 0..20 {
        let body = format!("acked-by-a-{i}");
        pub_a.publish(&format!("{parent}/k/{i}"), v4::QoS::AtLeastOnce, false, body.as_bytes()).await;
        acked_by_a.push(body);
    }
    a.sigkill();
    durable.kill();
    pub_a.kill();
    let stored: Vec<String> = reader
        .read(acked_by_a.len(), Duration::from_secs(10))
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(stored, acked_by_a, "every message A acknowledged, in order");

    // A retained message published on A (before it died) is known to B.
    let mut pub_b = v4::connect(b.addr, &id("pubB")).await;
    let mut late = v4::connect(b.addr, &id("late")).await;
    late.subscribe(&format!("{parent}/r/#"), v4::QoS::AtLeastOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain, "retained flag on subscribe-time delivery");
    assert_eq!((p.topic, &p.payload[..]), (format!("{parent}/r/state"), &b"on"[..]));
    late.disconnect().await;

    let mut acked = Vec::new();
    for i in 0..20 {
        let body = format!("offline-{i}");
        pub_b.publish(&format!("{parent}/s/{i}"), v4::QoS::AtLeastOnce, false, body.as_bytes()).await;
        acked.push(body);
    }
    let mut opts = v4::options(b.addr, &id("durable"));
    opts.set_clean_session(false);
    let mut resumed = v4::connect_with(opts).await;
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let p = resumed.next_publish().await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(got, acked, "every acknowledged message, in order, and not `before` again");
    assert!(resumed.no_publish(Duration::from_millis(500)).await);
    for c in [sub_b, resumed, pub_b] {
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_gone_means_no_acknowledgement() {
    let Some(broker) = rocketmq_broker::OwnBroker::start() else { return };
    let parent = parent("gone");
    let mut yaml = yaml(&broker.namesrv, &parent, "gw-gone");
    yaml.push_str("mqtt:\n  backend_timeout_secs: 5\n");
    yaml = yaml.replace("    namesrv_addr:", "    send_timeout_ms: 1000\n    send_retries: 1\n    namesrv_addr:");
    let gw = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway starts");
    let mut publisher = v4::connect(gw.addr(), "GID_gone@@@pub").await;
    publisher.publish(&format!("{parent}/a"), v4::QoS::AtLeastOnce, false, b"while up").await;

    broker.stop();
    publisher.client.publish(format!("{parent}/a"), v4::QoS::AtLeastOnce, false, "while down").await.unwrap();
    // No PUBACK, ever: the gateway gives up and closes the connection instead.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, publisher.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Incoming::PubAck(_))))) => panic!("acknowledged without the broker"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => break,
            Err(_) => panic!("connection neither acknowledged nor closed within 30 s"),
        }
    }
    assert!(!gw.ctx.backend.is_available(), "not ready while the broker is gone");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_recovers_when_the_broker_restarts() {
    let Some(broker) = rocketmq_broker::OwnBroker::start() else { return };
    let parent = parent("restart");
    let yaml = yaml(&broker.namesrv, &parent, "gw-restart");
    let gw = Gateway::start(Config::from_yaml(&yaml).expect("config")).await.expect("gateway starts");
    let mut sub = v4::connect(gw.addr(), "GID_restart@@@sub").await;
    sub.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(gw.addr(), "GID_restart@@@pub").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher.publish(&format!("{parent}/a"), v4::QoS::AtLeastOnce, false, b"before restart").await;
    assert_eq!(&sub.next_publish().await.payload[..], b"before restart");

    broker.restart();
    // Publishing works again once the client has reconnected (a publish that fails meanwhile
    // closes its connection unacknowledged; publishers reconnect and send again).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        publisher.client.publish(format!("{parent}/a"), v4::QoS::AtLeastOnce, false, "after restart").await.unwrap();
        let acked = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match publisher.events.recv().await {
                    Some(Ok(v4::Event::Incoming(v4::Incoming::PubAck(_)))) => return true,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if acked {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no publish acknowledged within 60 s of the restart");
        tokio::time::sleep(Duration::from_secs(1)).await;
        // While the core service is unavailable the gateway refuses CONNECT (server
        // unavailable): the publisher tries again, as a device would.
        publisher = loop {
            if let Some(c) = v4::try_connect(gw.addr(), "GID_restart@@@pub").await {
                break c;
            }
            assert!(tokio::time::Instant::now() < deadline, "no CONNECT accepted within 60 s of the restart");
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
    }
    // The subscriber's live tail resumed too, within seconds (the client library admits no new
    // connection to a broker for 30 s once 5 attempts have failed; the gateway replaces its
    // pull consumer instead of waiting that long).
    let p = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sub.events.recv().await {
                Some(Ok(v4::Event::Incoming(v4::Incoming::Publish(p)))) if &p.payload[..] == b"after restart" => {
                    return p
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("subscriber connection failed: {e}"),
                None => panic!("subscriber event loop ended"),
            }
        }
    })
    .await
    .expect("subscriber gets the message published after the restart");
    assert_eq!(p.topic, format!("{parent}/a"));
    // State reads work again (a persistent session is loaded at CONNECT), and the service is ready.
    let mut opts = v4::options(gw.addr(), "GID_restart@@@durable");
    opts.set_clean_session(false);
    v4::connect_with(opts).await.disconnect().await;
    let ready_by = tokio::time::Instant::now() + Duration::from_secs(10);
    while !gw.ctx.backend.is_available() {
        assert!(tokio::time::Instant::now() < ready_by, "still unavailable 10 s after recovering");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
}

/// Issue 13: with parent `*`, every first topic level maps to a RocketMQ topic — but never to
/// the gateway's state topic, its events topic or RocketMQ's system topics. Subscribing and
/// publishing there is refused, and nothing a device sent reaches those topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_cannot_reach_internal_topics() {
    let Some(namesrv) = rocketmq_broker::namesrv() else { return };
    let gw = gateway(&namesrv, "\"*\"", "gw-hostile").await;
    let internal = ["LMQ_GATEWAY_STATE", "GID_LMQ_STATUS"];
    let mut readers = Vec::new();
    for topic in internal {
        readers.push((topic, plain::Reader::at_end(&namesrv, topic, "*").await));
    }
    for topic in internal.iter().chain(&["TBW102", "RMQ_SYS_TRACE_TOPIC", "SCHEDULE_TOPIC_XXXX"]) {
        common::assert_topic_unreachable(gw.addr(), topic, |_| None).await;
    }
    // An ordinary topic still works for the same kind of client.
    let ordinary = parent("hostile");
    let mut ok = v4::connect(gw.addr(), "GID_h@@@ordinary").await;
    ok.publish(&format!("{ordinary}/x"), v4::QoS::AtLeastOnce, false, b"device-bytes-ok").await;
    ok.disconnect().await;
    let mut check = plain::Reader::at_end(&namesrv, &ordinary, "*").await;
    let mut ok = v4::connect(gw.addr(), "GID_h@@@ordinary2").await;
    ok.publish(&format!("{ordinary}/x"), v4::QoS::AtLeastOnce, false, b"device-bytes-ok").await;
    assert_eq!(check.read(1, WAIT).await.len(), 1, "the plain reader sees an ordinary publish");
    ok.disconnect().await;

    for (topic, reader) in &mut readers {
        // The state topic and the events topic carry the gateway's own writes (connect events,
        // sessions), never a device's bytes.
        let leaked: Vec<_> = reader
            .read(usize::MAX, Duration::from_secs(2))
            .await
            .into_iter()
            .filter(|m| m.body().is_some_and(|b| b.starts_with(b"device-bytes")))
            .collect();
        assert!(leaked.is_empty(), "device records in {topic}: {leaked:?}");
    }
    gw.shutdown().await;
}

/// The hostile-client checks (`tests/hostile`) with sessions, offline messages, credentials
/// and events in RocketMQ, and RocketMQ's own topics among the reserved names.
macro_rules! on_rocketmq {
    ($module:ident; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(namesrv) = crate::rocketmq_broker::namesrv() else { return };
            crate::$module::$name(&crate::hostile::Core::rocketmq(&namesrv)).await;
        }
    )*};
}

mod hostile_checks {
    for_each_session_check!(on_rocketmq);
    for_each_namespace_check!(on_rocketmq);
    for_each_bounds_check!(on_rocketmq);
    for_each_crash_check!(on_rocketmq);
}

mod ops_checks {
    for_each_ops_check!(on_rocketmq);
    for_each_cluster_ops_check!(on_rocketmq);
}

mod delay_checks {
    for_each_delay_check!(on_rocketmq);
    for_each_delay_crash_check!(on_rocketmq);
    for_each_cluster_delay_check!(on_rocketmq);
}
