//! MQTT 3.1.1 behaviour with a real client (rumqttc v4) against a real gateway.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use common::v4::{self, Event, Incoming, LastWill, QoS};
use common::TestGateway;
use std::time::Duration;

#[tokio::test]
async fn qos0_qos1_qos2_reach_a_subscriber() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "sub-1").await;
    let ack = sub.subscribe("sensors/+/temp", QoS::ExactlyOnce).await;
    assert_eq!(ack.return_codes, vec![rumqttc::SubscribeReasonCode::Success(QoS::ExactlyOnce)]);
    let mut publ = v4::connect(gw.addr, "pub-1").await;
    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        let payload = format!("m{i}");
        publ.publish("sensors/room1/temp", qos, false, payload.as_bytes()).await;
        let got = sub.next_publish().await;
        assert_eq!(got.topic, "sensors/room1/temp");
        assert_eq!(&got.payload[..], payload.as_bytes());
        assert_eq!(got.qos, qos);
        assert!(!got.retain);
    }
    // Non-matching topics are not delivered.
    publ.publish("sensors/room1/humidity", QoS::AtLeastOnce, false, b"x").await;
    assert!(sub.no_publish(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "sub-q").await;
    sub.subscribe("a/#", QoS::AtLeastOnce).await;
    let mut publ = v4::connect(gw.addr, "pub-q").await;
    publ.publish("a/b", QoS::ExactlyOnce, false, b"x").await;
    assert_eq!(sub.next_publish().await.qos, QoS::AtLeastOnce);
    publ.publish("a/b", QoS::AtMostOnce, false, b"y").await;
    assert_eq!(sub.next_publish().await.qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn wildcards_and_dollar_topics() {
    let gw = TestGateway::start().await;
    let mut all = v4::connect(gw.addr, "all").await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    let mut publ = v4::connect(gw.addr, "pub-w").await;
    publ.publish("x/y/z", QoS::AtLeastOnce, false, b"1").await;
    assert_eq!(all.next_publish().await.topic, "x/y/z");
    // Publishing to a `$` topic is refused: a 3.1.1 client has no negative PUBACK, so the
    // connection closes.
    publ.client.publish("$SYS/x", QoS::AtLeastOnce, false, b"no").await.unwrap();
    publ.closed_by_server().await;
}

#[tokio::test]
async fn retained_message_is_sent_on_subscribe_and_cleared_by_empty_payload() {
    let gw = TestGateway::start().await;
    let mut publ = v4::connect(gw.addr, "pub-r").await;
    publ.publish("status/dev1", QoS::AtLeastOnce, true, b"online").await;
    let mut sub = v4::connect(gw.addr, "sub-r").await;
    sub.subscribe("status/+", QoS::AtLeastOnce).await;
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"online");
    assert!(got.retain, "retained messages are flagged on subscribe");
    // Live delivery of a retained publish to an existing subscriber has retain = 0.
    publ.publish("status/dev1", QoS::AtLeastOnce, true, b"busy").await;
    let live = sub.next_publish().await;
    assert_eq!(&live.payload[..], b"busy");
    assert!(!live.retain);
    // An empty retained payload clears it.
    publ.publish("status/dev1", QoS::AtLeastOnce, true, b"").await;
    sub.next_publish().await;
    let mut late = v4::connect(gw.addr, "sub-r2").await;
    late.subscribe("status/#", QoS::AtLeastOnce).await;
    assert!(late.no_publish(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn will_is_published_on_abrupt_close_but_not_on_disconnect() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "will-sub").await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut o = v4::options(gw.addr, "will-a");
    o.set_last_will(LastWill::new("wills/a", "gone-a", QoS::AtLeastOnce, false));
    let a = v4::connect_with(o).await;
    a.kill();
    let got = sub.next_publish().await;
    assert_eq!(got.topic, "wills/a");
    assert_eq!(&got.payload[..], b"gone-a");

    let mut o = v4::options(gw.addr, "will-b");
    o.set_last_will(LastWill::new("wills/b", "gone-b", QoS::AtLeastOnce, false));
    let b = v4::connect_with(o).await;
    b.disconnect().await;
    assert!(sub.no_publish(Duration::from_millis(500)).await, "no will after DISCONNECT");
}

#[tokio::test]
async fn persistent_session_gets_offline_messages_and_not_acked_ones() {
    let gw = TestGateway::start().await;
    let mut o = v4::options(gw.addr, "persist-1");
    o.set_clean_session(false);
    let mut dev = v4::connect_with(o.clone()).await;
    dev.subscribe("cmd/#", QoS::AtLeastOnce).await;
    let mut app = v4::connect(gw.addr, "app-1").await;
    app.publish("cmd/1", QoS::AtLeastOnce, false, b"before").await;
    assert_eq!(&dev.next_publish().await.payload[..], b"before");
    // Let the PUBACK reach the gateway, then go offline.
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.disconnect().await;
    for i in 0..5 {
        app.publish("cmd/1", QoS::AtLeastOnce, false, format!("offline-{i}").as_bytes()).await;
    }
    app.publish("cmd/1", QoS::AtMostOnce, false, b"qos0-offline").await;
    let mut dev = v4::connect_with(o).await;
    for i in 0..5 {
        let p = dev.next_publish().await;
        assert_eq!(String::from_utf8_lossy(&p.payload), format!("offline-{i}"));
    }
    // Nothing else: the acknowledged message is not repeated, QoS 0 is not kept offline...
    // ...strictly, the QoS 0 record is in the log and matches; we deliver it at QoS 0.
    let next = tokio::time::timeout(Duration::from_millis(500), dev.next_publish()).await;
    if let Ok(p) = next {
        assert_eq!(&p.payload[..], b"qos0-offline", "only the offline QoS 0 message may follow");
    }
}

#[tokio::test]
async fn clean_session_forgets_subscriptions() {
    let gw = TestGateway::start().await;
    let mut o = v4::options(gw.addr, "clean-1");
    o.set_clean_session(false);
    let mut dev = v4::connect_with(o).await;
    dev.subscribe("c/#", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    let mut dev = v4::connect(gw.addr, "clean-1").await; // clean session
    let mut app = v4::connect(gw.addr, "app-c").await;
    app.publish("c/1", QoS::AtLeastOnce, false, b"x").await;
    assert!(dev.no_publish(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn duplicate_client_id_takes_over() {
    let gw = TestGateway::start().await;
    let mut first = v4::connect(gw.addr, "dup").await;
    let _second = v4::connect(gw.addr, "dup").await;
    // The first connection is closed by the server.
    first.closed_by_server().await;
}

#[tokio::test]
async fn session_survives_a_gateway_restart() {
    let mut gw = TestGateway::start().await;
    let mut o = v4::options(gw.addr, "restart-dev");
    o.set_clean_session(false);
    let mut dev = v4::connect_with(o).await;
    dev.subscribe("r/#", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    let mut app = v4::connect(gw.addr, "restart-app").await;
    app.publish("r/1", QoS::AtLeastOnce, false, b"kept").await;
    app.publish("keep/x", QoS::AtLeastOnce, true, b"retained").await;
    app.disconnect().await;

    gw.restart().await;

    let mut o = v4::options(gw.addr, "restart-dev");
    o.set_clean_session(false);
    let mut dev = v4::connect_with(o).await;
    assert_eq!(&dev.next_publish().await.payload[..], b"kept");
    let mut late = v4::connect(gw.addr, "restart-late").await;
    late.subscribe("keep/#", QoS::AtLeastOnce).await;
    let r = late.next_publish().await;
    assert_eq!(&r.payload[..], b"retained");
    assert!(r.retain);
}

#[tokio::test]
async fn p2p_reaches_only_the_target() {
    let gw = TestGateway::start().await;
    let mut target = v4::connect(gw.addr, "GID_dev@@@d1").await;
    let mut other = v4::connect(gw.addr, "GID_dev@@@d2").await;
    other.subscribe("cmd/#", QoS::AtLeastOnce).await;
    let mut app = v4::connect(gw.addr, "app-p2p").await;
    app.publish("cmd/p2p/GID_dev@@@d1", QoS::AtLeastOnce, false, b"hello d1").await;
    let got = target.next_publish().await;
    assert_eq!(&got.payload[..], b"hello d1");
    assert!(other.no_publish(Duration::from_millis(300)).await, "P2P is not seen by wildcard subscribers");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let gw = TestGateway::start().await;
    let mut sub = v4::connect(gw.addr, "unsub").await;
    sub.subscribe("u/#", QoS::AtLeastOnce).await;
    sub.client.unsubscribe("u/#").await.unwrap();
    sub.wait_for(|e| matches!(e, Event::Incoming(Incoming::UnsubAck(_)))).await;
    let mut app = v4::connect(gw.addr, "unsub-app").await;
    app.publish("u/1", QoS::AtLeastOnce, false, b"x").await;
    assert!(sub.no_publish(Duration::from_millis(300)).await);
}
