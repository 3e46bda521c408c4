//! Overdue delayed messages (every gateway was down past their due times) come out in due
//! order.

use super::*;
use crate::common::v5;
use crate::hostile::{unique, OPEN_AUTH};
use rumqttc::v5::mqttbytes::QoS;

/// Twenty messages with delays of 1 … 20 minutes, published in a scrambled order, all become
/// overdue at once when the delay clock jumps an hour ahead (what a gateway coming back after an
/// outage sees): the subscriber gets each once, in due order.
pub async fn overdue_messages_are_delivered_in_due_order(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(OPEN_AUTH)).await;
    wait_forwarding(&gw).await;
    let topic = format!("{}/overdue", unique("order"));
    let mut sub = v5::connect(gw.addr(), &unique("sub")).await;
    sub.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut publisher = v5::connect(gw.addr(), &unique("pub")).await;
    // Minutes 1..=20 in a fixed scrambled order (7 is coprime with 20).
    let minutes: Vec<u64> = (0..20).map(|i| (i * 7) % 20 + 1).collect();
    for m in &minutes {
        publisher
            .client
            .publish(format!("$delayed/{}/{topic}", m * 60), QoS::AtLeastOnce, false, format!("{m:02}"))
            .await
            .unwrap();
        publisher.wait_for(|e| matches!(e, rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)))).await;
    }
    // Nothing is due yet.
    assert!(nothing_within(&mut sub, Duration::from_millis(1500)).await, "delivered early");
    // The forwarders have read them all (none is still being read when the clock jumps).
    wait_pending(&gw, minutes.len() as i64).await;
    gw.ctx.delay.clock.advance(3_600_000);
    let mut got = Vec::new();
    for _ in 0..minutes.len() {
        let p = sub.next_publish().await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let want: Vec<String> = (1..=20).map(|m| format!("{m:02}")).collect();
    assert_eq!(got, want, "overdue messages in due order");
    assert!(nothing_within(&mut sub, Duration::from_secs(2)).await, "a message came twice");
}

/// No PUBLISH reaches `c` within `d`.
async fn nothing_within(c: &mut v5::Client, d: Duration) -> bool {
    use rumqttc::v5::{Event, Incoming};
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(Event::Incoming(Incoming::Publish(_))))) => return false,
            Ok(Some(Ok(_))) => {}
            _ => return true,
        }
    }
}
