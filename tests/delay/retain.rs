//! The retain flag of a delayed message applies when it is delivered.

use super::*;
use crate::hostile::{unique, OPEN_AUTH};

/// Retained messages a fresh subscriber of `topic` gets within `wait`, as (payload, retain).
async fn retained(gw: &Gateway, topic: &str, wait: Duration) -> Vec<(String, bool)> {
    let c = Collector::start(gw.addr(), &unique("retain-probe"), true, 0, &[topic]).await;
    tokio::time::sleep(wait).await;
    c.got().into_iter().map(|g| (g.payload, g.retain)).collect()
}

/// `$delayed/2/<a>` with retain set: before it is due a new subscriber of `<a>` gets nothing
/// (and a subscriber from before gets nothing yet); once due, the subscriber from before gets
/// it and a new subscriber gets it as a retained message. A delayed retained message with an
/// empty payload on `<b>` deletes `<b>`'s retained message only once due: a new subscriber
/// still gets the old one before, none after.
pub async fn a_retained_delayed_message_is_retained_only_once_due(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(&format!("{OPEN_AUTH}{DELAY}"))).await;
    wait_forwarding(&gw).await;
    let parent = unique("delayretain");
    let (a, b) = (format!("{parent}/a"), format!("{parent}/b"));
    let (code, _) = publish_one(gw.addr(), &b, "kept-until-due", true, &[]).await;
    assert_eq!(code, 0);
    let live = Collector::start(gw.addr(), &unique("retain-live"), true, 0, &[&a]).await;

    let sent = now_ms();
    let (code, acked) = publish_one(gw.addr(), &format!("$delayed/2/{a}"), "retained-later", true, &[]).await;
    assert_eq!(code, 0, "PUBACK of a retained delayed message");
    let (code, _) = publish_one(gw.addr(), &format!("$delayed/2/{b}"), "", true, &[]).await;
    assert_eq!(code, 0, "PUBACK of a delayed retained delete");

    // Before due (probes subscribe and wait until 1.5 s after the PUBACK).
    let wait = Duration::from_millis((acked + 1500 - now_ms()).max(0) as u64);
    let (before_a, before_b) = tokio::join!(retained(&gw, &a, wait), retained(&gw, &b, wait));
    assert!(now_ms() < sent + 2000, "the probes took too long to say anything about before due");
    assert_eq!(before_a, vec![], "retained for a new subscriber before due");
    assert_eq!(before_b, vec![("kept-until-due".to_string(), true)], "the old retained message before due");
    assert_eq!(live.count(), 0, "delivered before due: {:?}", live.got());

    // Due: delivered to the subscriber from before, and retained from then on.
    let got = live.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1, "not delivered within 3 s of due");
    assert_eq!(got[0].payload, "retained-later");
    assert!(got[0].at_ms >= sent + 2000, "delivered {} ms after the send", got[0].at_ms - sent);
    assert!(got[0].at_ms <= acked + 3000, "delivered {} ms after the PUBACK", got[0].at_ms - acked);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wait = Duration::from_millis(1000);
    let (after_a, after_b) = tokio::join!(retained(&gw, &a, wait), retained(&gw, &b, wait));
    assert_eq!(after_a, vec![("retained-later".to_string(), true)], "retained for a new subscriber once due");
    assert_eq!(after_b, vec![], "the retained message deleted once due");
    assert_eq!(live.count(), 1, "delivered more than once: {:?}", live.got());
    drop(gw);
}
