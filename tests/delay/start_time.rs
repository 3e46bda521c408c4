//! MQTT 5's `__STARTDELIVERTIME` user property (epoch ms, RocketMQ's name).

use super::*;
use crate::hostile::{unique, OPEN_AUTH};

/// A PUBLISH with `__STARTDELIVERTIME` = now + 2 s and two other user properties arrives no
/// earlier than that time and at most 1 s after it, without `__STARTDELIVERTIME` and with the
/// other user properties as sent (order kept). One with a time a minute in the past is
/// delivered at once (within 1 s of its PUBACK, the time a message takes through the core service), also without the property.
/// On a `$delayed/1/…` topic with `__STARTDELIVERTIME` a minute ahead, the topic's second
/// counts and the property is removed.
pub async fn start_deliver_time_is_honoured_and_removed_and_a_past_time_is_now(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(&format!("{OPEN_AUTH}{DELAY}"))).await;
    wait_forwarding(&gw).await;
    let topic = format!("{}/at", unique("delaystart"));
    let sub = Collector::start(gw.addr(), &unique("start-sub"), true, 0, &[&topic]).await;
    let others = [("color", "blue".to_string()), ("n", "1".to_string())];

    let due = now_ms() + 2000;
    let props = [("color", others[0].1.clone()), ("__STARTDELIVERTIME", due.to_string()), ("n", others[1].1.clone())];
    let (code, _) = publish_one(gw.addr(), &topic, "at-due", false, &props).await;
    assert_eq!(code, 0, "PUBACK of a message due in 2 s");
    let got = sub.wait_for(1, Duration::from_secs(6)).await;
    assert_eq!(got.len(), 1, "not delivered within 4 s of due");
    let g = &got[0];
    assert_eq!(g.payload, "at-due");
    assert!(g.at_ms >= due, "delivered {} ms before due", due - g.at_ms);
    assert!(g.at_ms - due <= 1000, "delivered {} ms after due", g.at_ms - due);
    let expected: Vec<(String, String)> = others.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    assert_eq!(g.user_properties, expected, "user properties as delivered");

    let past = now_ms() - 60_000;
    let (code, acked) =
        publish_one(gw.addr(), &topic, "in-the-past", false, &[("__STARTDELIVERTIME", past.to_string())]).await;
    assert_eq!(code, 0, "PUBACK of a message due a minute ago");
    let got = sub.wait_for(2, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2, "a message due in the past was not delivered within 3 s");
    let g = &got[1];
    assert_eq!(g.payload, "in-the-past");
    assert!(g.at_ms - acked <= 1000, "a message due in the past arrived {} ms after its PUBACK", g.at_ms - acked);
    assert!(g.user_properties.is_empty(), "user properties as delivered: {:?}", g.user_properties);

    // On a `$delayed/1/…` topic the topic's delay counts, not the property (a minute ahead),
    // and the property is not passed on.
    let later = now_ms() + 60_000;
    let delayed = format!("$delayed/1/{topic}");
    let (code, acked) =
        publish_one(gw.addr(), &delayed, "both", false, &[("__STARTDELIVERTIME", later.to_string())]).await;
    assert_eq!(code, 0, "PUBACK of a $delayed message with __STARTDELIVERTIME");
    let got = sub.wait_for(3, Duration::from_secs(4)).await;
    assert_eq!(
        got.len(),
        3,
        "a $delayed/1 message with __STARTDELIVERTIME a minute ahead was not delivered within 4 s"
    );
    let g = &got[2];
    assert_eq!(g.payload, "both");
    assert!(g.at_ms - acked <= 2000, "delivered {} ms after its PUBACK", g.at_ms - acked);
    assert!(g.user_properties.is_empty(), "user properties as delivered: {:?}", g.user_properties);

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sub.count(), 3, "delivered more than once: {:?}", sub.got());
    drop(gw);
}
