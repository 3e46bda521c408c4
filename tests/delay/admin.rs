//! Delayed messages sent through the admin API (`POST /api/v1/messages`).

use super::*;
use crate::hostile::{unique, OPEN_AUTH};
use serde_json::json;

/// `delay_secs: 2` and `deliver_at_ms: now + 3 s` are answered 200 with the due time and
/// delivered no earlier than due and at most 1 s after; `delay_secs: 0` at once (within 1 s, the time any message takes through the core service). Out of range
/// (`delay_secs` 3,456,001, `deliver_at_ms` beyond 40 days or negative), both given, or not a
/// number of seconds: 400 (`invalid_delay`, or `invalid_body` where the JSON is not a
/// non-negative integer), counted in `lmq_delayed_refused_total` where it is a delay out of
/// range, and never delivered.
pub async fn admin_send_with_delay_secs_or_deliver_at_ms_is_delayed_and_bad_values_are_400(core: &Core) {
    let _turn = serial().await;
    let gw = core.start(&isolated(&format!("{OPEN_AUTH}{DELAY}{ADMIN}"))).await;
    wait_forwarding(&gw).await;
    let topic = format!("{}/api", unique("delayadmin"));
    let sub = Collector::start(gw.addr(), &unique("admin-sub"), true, 0, &[&topic]).await;
    let (malformed, too_long) = (refused(&gw, "malformed"), refused(&gw, "too_long"));

    let far = now_ms() + 40 * 86_400_000 + 60_000;
    let bad = [
        (json!({"topic": topic, "payload": "bad-1", "delay_secs": 3_456_001}), "invalid_delay"),
        (json!({"topic": topic, "payload": "bad-2", "deliver_at_ms": far}), "invalid_delay"),
        (json!({"topic": topic, "payload": "bad-3", "deliver_at_ms": -1}), "invalid_delay"),
        (
            json!({"topic": topic, "payload": "bad-4", "delay_secs": 1, "deliver_at_ms": now_ms() + 1000}),
            "invalid_delay",
        ),
        (json!({"topic": topic, "payload": "bad-5", "delay_secs": -1}), "invalid_body"),
        (json!({"topic": topic, "payload": "bad-6", "delay_secs": "2"}), "invalid_body"),
        (json!({"topic": topic, "payload": "bad-7", "deliver_at_ms": 1.5}), "invalid_body"),
    ];
    for (body, code) in &bad {
        let (status, answer) = api(&gw, "POST", "/api/v1/messages", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], *code, "{body}: {answer}");
    }
    assert_eq!(refused(&gw, "too_long") - too_long, 2, "lmq_delayed_refused_total{{reason=too_long}}");
    assert_eq!(refused(&gw, "malformed") - malformed, 1, "lmq_delayed_refused_total{{reason=malformed}}");

    let sent = now_ms();
    let (status, answer) =
        api(&gw, "POST", "/api/v1/messages", Some(json!({"topic": topic, "payload": "in-2-s", "delay_secs": 2}))).await;
    let answered = now_ms();
    assert_eq!(status, 200, "{answer}");
    let due_secs = answer["deliver_at_ms"].as_i64().expect("deliver_at_ms in the answer");
    assert!((sent + 2000..=answered + 2000).contains(&due_secs), "deliver_at_ms {due_secs}, sent at {sent}");
    let at = now_ms() + 3000;
    let (status, answer) =
        api(&gw, "POST", "/api/v1/messages", Some(json!({"topic": topic, "payload": "at-3-s", "deliver_at_ms": at})))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["deliver_at_ms"], at);
    let (status, answer) =
        api(&gw, "POST", "/api/v1/messages", Some(json!({"topic": topic, "payload": "now", "delay_secs": 0}))).await;
    let now_answered = now_ms();
    assert_eq!(status, 200, "{answer}");

    let got = sub.wait_for(3, Duration::from_secs(8)).await;
    let payloads: Vec<&str> = got.iter().map(|g| g.payload.as_str()).collect();
    assert_eq!(payloads, vec!["now", "in-2-s", "at-3-s"], "delivered");
    assert!(
        got[0].at_ms - now_answered <= 1000,
        "delay_secs 0 arrived {} ms after the answer",
        got[0].at_ms - now_answered
    );
    assert!(
        got[1].at_ms >= due_secs && got[1].at_ms - due_secs <= 1000,
        "delay_secs 2: {} ms after due",
        got[1].at_ms - due_secs
    );
    assert!(got[2].at_ms >= at && got[2].at_ms - at <= 1000, "deliver_at_ms: {} ms after due", got[2].at_ms - at);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sub.count(), 3, "delivered: {:?}", sub.got());
    drop(gw);
}
