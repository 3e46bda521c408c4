//! The reserved namespace (SPEC §8) against a device with an ordinary key that may publish and
//! subscribe `#` under parent `*` (the shipped configuration): it cannot read the status
//! events, cannot forge one, cannot reach any internal topic of the core service, and a `#`
//! subscription carries none of them, while ordinary messages flow as usual.

use super::*;
use crate::common::{v4, v5};
use lmq_gateway::events::{ClientEvent, EventType, GATEWAY_HEADER};
use lmq_gateway::limits::Refusal;

async fn device_v4(addr: SocketAddr, id: &str) -> v4::Client {
    let mut o = v4::options(addr, id);
    o.set_credentials(USER, sign("s3cret", id));
    v4::connect_with(o).await
}

async fn device_v5(addr: SocketAddr, id: &str) -> v5::Client {
    let mut o = v5::options(addr, id);
    o.set_credentials(USER, sign("s3cret", id));
    v5::connect_with(o).await.0
}

async fn raw(addr: SocketAddr, id: &str, protocol: Protocol) -> Raw {
    let (raw, code) = crate::common::raw_connect(addr, id, protocol, login(id), None).await;
    assert_eq!(code, 0, "{id} connects");
    raw
}

fn forged_connect(victim: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "eventType": "connect",
        "clientId": victim,
        "channelId": "forged-channel",
        "clientIp": "10.6.6.6",
        "time": lmq_gateway::now_ms() + 60_000,
        "gatewayId": "forged",
    }))
    .expect("JSON")
}

/// Whether a message delivered to a device comes from the gateway's own records: a topic
/// whose first level is reserved, or a status event's body.
fn looks_internal(topic: &str, payload: &[u8], reserved: &[String]) -> bool {
    let first = topic.split('/').next().unwrap_or_default();
    reserved.iter().any(|r| r.eq_ignore_ascii_case(first))
        || first.to_ascii_lowercase().starts_with("lmq-")
        || serde_json::from_slice::<serde_json::Value>(payload).is_ok_and(|v| v.get("eventType").is_some())
}

/// Messages reaching `c` until one on `topic` has come and then nothing for `quiet`, as
/// (topic, payload). Other checks may publish on the same broker meanwhile.
async fn v4_until(c: &mut v4::Client, topic: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    loop {
        let seen = got.iter().any(|(t, _)| t == topic);
        let until = if seen { tokio::time::Instant::now() + quiet } else { deadline };
        match tokio::time::timeout_at(until, c.events.recv()).await {
            Ok(Some(Ok(v4::Event::Incoming(v4::Incoming::Publish(p))))) => got.push((p.topic, p.payload.to_vec())),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("connection error: {e}"),
            Ok(None) => panic!("event loop ended"),
            Err(_) if seen => return got,
            Err(_) => panic!("no message on {topic}: got {got:?}"),
        }
    }
}

async fn v5_until(c: &mut v5::Client, topic: &str, quiet: Duration) -> Vec<(String, Vec<u8>)> {
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    loop {
        let seen = got.iter().any(|(t, _)| t == topic);
        let until = if seen { tokio::time::Instant::now() + quiet } else { deadline };
        match tokio::time::timeout_at(until, c.events.recv()).await {
            Ok(Some(Ok(v5::Event::Incoming(v5::Packet::Publish(p))))) => {
                got.push((String::from_utf8_lossy(&p.topic).into_owned(), p.payload.to_vec()))
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("connection error: {e}"),
            Ok(None) => panic!("event loop ended"),
            Err(_) if seen => return got,
            Err(_) => panic!("no message on {topic}: got {got:?}"),
        }
    }
}

pub async fn events_topic_cannot_be_subscribed_and_wildcards_carry_no_events(core: &Core) {
    let gw = core.start(AUTH).await;
    let addr = gw.addr();
    // 3.1.1: the events topic (exactly, below it, in another case) is refused; `#` is granted.
    let mut spy = device_v4(addr, &unique("spy3")).await;
    for f in [EVENTS, "GID_LMQ_STATUS/#", "gid_lmq_status"] {
        let ack = spy.subscribe(f, v4::QoS::AtLeastOnce).await;
        assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Failure], "{f}");
    }
    let ack = spy.subscribe("#", v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]);
    // 5.0: Not authorized; `+/#` granted.
    let mut spy5 = device_v5(addr, &unique("spy5")).await;
    let ack = spy5.subscribe(EVENTS, v5::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]);
    let ack = spy5.subscribe("+/#", v5::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce)]);

    // Other devices come and go; one publishes an ordinary message meanwhile.
    let (other_1, other_2) = (unique("other-1"), unique("other-2"));
    device_v4(addr, &other_1).await.disconnect().await;
    device_v4(addr, &other_2).await.kill();
    let topic = format!("{}/room1", unique("sensors"));
    let mut publisher = device_v4(addr, &unique("pub-1")).await;
    publisher.publish(&topic, v4::QoS::AtLeastOnce, false, b"21.5").await;

    // The wildcard subscribers get the message, and no status event (nor anything else of
    // the gateway's own) with it.
    let reserved = core.reserved_names();
    for (who, got) in [
        ("3.1.1 `#`", v4_until(&mut spy, &topic, Duration::from_millis(800)).await),
        ("5.0 `+/#`", v5_until(&mut spy5, &topic, Duration::from_millis(200)).await),
    ] {
        assert!(got.iter().any(|(t, p)| *t == topic && p == b"21.5"), "{who}: {got:?}");
        let leaked: Vec<_> = got.iter().filter(|(t, p)| looks_internal(t, p, &reserved)).collect();
        assert!(leaked.is_empty(), "{who} subscriber got the gateway's records: {leaked:?}");
    }
    // The events were written: there was something to leak.
    let events = status_events(&gw, &[&other_1, &other_2]).await;
    for id in [&other_1, &other_2] {
        assert!(events.iter().any(|(t, b)| t == "connect" && b["clientId"] == **id), "{id} connect event: {events:?}");
    }
    assert_eq!(gw.ctx.limits.refused(Refusal::ReservedTopic), 4);
    drop(gw);
}

pub async fn forged_connect_event_is_refused_and_the_victim_stays_connected(core: &Core) {
    let gw = core.start(AUTH).await;
    let addr = gw.addr();
    let victim_id = unique("victim");
    let topic = format!("{}/victim", unique("cmd"));
    let mut victim = device_v4(addr, &victim_id).await;
    victim.subscribe(&topic, v4::QoS::AtLeastOnce).await;

    // MQTT 5, QoS 1 and 2: negative acknowledgement, the attacker stays connected.
    let mut attacker = raw(addr, &unique("attacker5"), Protocol::V5).await;
    attacker.send(&crate::common::publish_packet(1, EVENTS, QoS::AtLeastOnce, &forged_connect(&victim_id))).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::NOT_AUTHORIZED));
    attacker.send(&crate::common::publish_packet(2, EVENTS, QoS::ExactlyOnce, &forged_connect(&victim_id))).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PubRec(a)) if a.code == ReasonCode::NOT_AUTHORIZED));
    attacker.send(&Packet::PingReq).await;
    assert!(matches!(attacker.recv().await, Some(Packet::PingResp)), "attacker still connected");
    // MQTT 3.1.1: no negative PUBACK exists; the publisher is disconnected.
    let mut attacker3 = raw(addr, &unique("attacker3"), Protocol::V311).await;
    attacker3.send(&crate::common::publish_packet(1, EVENTS, QoS::AtLeastOnce, &forged_connect(&victim_id))).await;
    assert!(attacker3.until_closed().await.is_empty(), "3.1.1: closed without PUBACK");

    // The victim is still there and still receives.
    let mut sender = device_v4(addr, &unique("sender")).await;
    sender.publish(&topic, v4::QoS::AtLeastOnce, false, b"still-here").await;
    let m = victim.next_publish().await;
    assert_eq!(&m.payload[..], b"still-here");
    assert!(gw.ctx.registry.get(&victim_id).is_some(), "victim still registered");
    // Nothing forged reached the events topic; the victim's own connect did.
    let events = status_events(&gw, &[&victim_id]).await;
    assert!(events.iter().any(|(t, _)| t == "connect"), "{events:?}");
    assert!(events.iter().all(|(_, b)| b["gatewayId"] != "forged"), "{events:?}");
    drop(gw);
}

/// Every reserved name of the core service, for PUBLISH (QoS 0, 1, 2), SUBSCRIBE (exact,
/// below, shared) and wills, over MQTT 3.1.1 and 5.0; each refusal is counted. A renamed
/// events topic is reserved under its new name, and the old name is an ordinary topic.
pub async fn internal_topic_names_are_refused_for_publish_and_subscribe(core: &Core) {
    let admin = format!("admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token: {}\n", crate::common::ADMIN_TOKEN);
    let gw = core.start(&format!("{AUTH}{admin}")).await;
    let names = core.reserved_names();
    for topic in &names {
        crate::common::assert_topic_unreachable(gw.addr(), topic, login).await;
    }
    // Counted by reason: per name 6 SUBSCRIBEs, 6 PUBLISHes, 2 wills.
    let admin_addr = gw.admin_addr().expect("admin API");
    let metrics = crate::common::http()
        .get(format!("http://{admin_addr}/metrics"))
        .bearer_auth(crate::common::ADMIN_TOKEN)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics");
    let refused = crate::common::metric_value(&metrics, "lmq_limit_refusals_total", &[("reason", "reserved_topic")]);
    assert_eq!(refused, names.len() as f64 * 14.0, "refusals counted for {names:?}");
    gw.shutdown().await;

    let renamed = unique("EV_status");
    let gw = core.start(&format!("topics:\n  events_topic: {renamed}\n{AUTH}")).await;
    crate::common::assert_topic_unreachable(gw.addr(), &renamed, login).await;
    let mut c = raw(gw.addr(), &unique("free"), Protocol::V5).await;
    assert_eq!(c.suback_code(1, EVENTS).await, 0x01, "the old events topic is an ordinary one");
    assert_eq!(gw.ctx.limits.refused(Refusal::ReservedTopic), 14);
    drop(gw);
}

/// Cross-gateway takeover acts only on events gateways wrote: a `connect` event of a
/// connected ClientId written into the events topic around the gateway (as an application
/// with write access to the core service could), without the gateway marker, kicks no one;
/// the same event with the marker does.
pub async fn only_events_marked_by_a_gateway_take_a_client_over(core: &Core) {
    let gw = core.start(AUTH).await;
    let victim_id = unique("victim");
    let topic = format!("{}/victim", unique("cmd"));
    let mut victim = device_v4(gw.addr(), &victim_id).await;
    victim.subscribe(&topic, v4::QoS::AtLeastOnce).await;
    let backend = gw.ctx.backend.clone();
    let event = ClientEvent {
        event_type: EventType::Connect,
        client_id: victim_id.clone(),
        channel_id: "elsewhere".into(),
        client_ip: "10.0.0.9".into(),
        time: lmq_gateway::now_ms() + 60_000,
        gateway_id: "gw-other".into(),
        username: None,
        reason: None,
    };
    let mut unmarked = event.to_record();
    unmarked.headers.retain(|(k, _)| k != GATEWAY_HEADER);
    backend.append(EVENTS, unmarked).await.expect("appended");
    // Time for the gateway to follow the events topic past it (the marked event below is
    // acted on well within this).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sender = device_v4(gw.addr(), &unique("sender")).await;
    sender.publish(&topic, v4::QoS::AtLeastOnce, false, b"after-unmarked").await;
    assert_eq!(&victim.next_publish().await.payload[..], b"after-unmarked");
    assert!(gw.ctx.registry.get(&victim_id).is_some(), "an unmarked event kicked the victim");
    // The genuine event of another gateway does take the ClientId over (the check can fail).
    backend.append(EVENTS, event.to_record()).await.expect("appended");
    victim.closed_by_server().await;
    drop(gw);
}

/// A persistent session stored before a topic became reserved (here: by moving
/// `topics.reserved_prefix`) loses that subscription when it returns: the CONNECT succeeds,
/// and records of the now-reserved topic are not delivered, neither stored while the client
/// was away nor live, while the session works.
pub async fn restored_subscriptions_to_reserved_topics_are_dropped(core: &Core) {
    let legacy_topic = unique("lmq-legacy");
    let cmd = format!("{}/legacy", unique("cmd"));
    let id = unique("legacy");
    let persistent = |addr| {
        let mut o = v4::options(addr, &id);
        o.set_credentials(USER, sign("s3cret", &id));
        o.set_clean_session(false);
        o
    };
    let gw = core.start(&format!("topics:\n  reserved_prefix: old-\n{AUTH}")).await;
    let mut c = v4::connect_with(persistent(gw.addr())).await;
    let ack = c.subscribe(&format!("{legacy_topic}/#"), v4::QoS::AtLeastOnce).await;
    assert_eq!(ack.return_codes, [rumqttc::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]);
    c.subscribe(&cmd, v4::QoS::AtLeastOnce).await;
    c.disconnect().await;
    gw.shutdown().await;

    let gw = core.start(&format!("topics:\n  reserved_prefix: lmq-\n{AUTH}")).await;
    // Written while the client is away, into the topic that is reserved now (around the
    // gateway, which no longer writes there).
    let record = |sub: &str, payload: &'static [u8]| lmq_gateway::backend::CoreRecord {
        key: None,
        headers: vec![("topic".into(), Bytes::from(format!("{legacy_topic}/{sub}")))],
        value: Bytes::from_static(payload),
        timestamp_ms: lmq_gateway::now_ms(),
    };
    let backend = gw.ctx.backend.clone();
    backend.ensure_topic(&legacy_topic, 1).await.expect("topic");
    backend.append(&legacy_topic, record("x", b"internal")).await.expect("append");
    let mut c = v4::connect_with(persistent(gw.addr())).await;
    let mut sender = device_v4(gw.addr(), &unique("sender")).await;
    sender.publish(&cmd, v4::QoS::AtLeastOnce, false, b"ordinary").await;
    let m = c.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), (cmd.as_str(), &b"ordinary"[..]));
    backend.append(&legacy_topic, record("y", b"internal-2")).await.expect("append");
    assert!(c.no_publish(Duration::from_millis(800)).await);
    drop(gw);
}
