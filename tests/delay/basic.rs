//! `$delayed/<seconds>/<topic>` and `__STARTDELIVERTIME` over MQTT.

use super::*;
use crate::common::v5;
use crate::hostile::{unique, OPEN_AUTH};
use rumqttc::v5::mqttbytes::QoS;
use std::time::{Duration, Instant};

/// A message published to `$delayed/2/<topic>` reaches a subscriber of `<topic>` no earlier
/// than 2 s after it was sent and at most 1 s late.
pub async fn a_delayed_message_arrives_no_earlier_than_due_and_about_on_time(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(OPEN_AUTH)).await;
    wait_forwarding(&gw).await;
    let topic = format!("{}/later", unique("delay"));
    let mut sub = v5::connect(gw.addr(), &unique("sub")).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut publisher = v5::connect(gw.addr(), &unique("pub")).await;
    let sent = Instant::now();
    publisher.client.publish(format!("$delayed/2/{topic}"), QoS::AtLeastOnce, false, "hello later").await.unwrap();
    publisher.wait_for(|e| matches!(e, rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)))).await;
    let acked = Instant::now();
    let p = sub.next_publish().await;
    let (since_sent, since_acked) = (sent.elapsed(), acked.elapsed());
    assert_eq!(&p.topic[..], topic.as_bytes());
    assert_eq!(&p.payload[..], b"hello later");
    // Due 2 s after the gateway received it, which is after it was sent and before the PUBACK
    // was seen here.
    assert!(since_sent >= Duration::from_millis(2000), "delivered {since_sent:?} after it was sent");
    assert!(since_acked <= Duration::from_millis(3000), "delivered {since_acked:?} after the PUBACK");
}
