//! Session reset through the admin API: to `latest` (a returning persistent session gets
//! none of its backlog), to a point in `time` (it gets what was stored from then on), to
//! `earliest` (everything the core service holds); a client connected to the gateway is
//! disconnected first and finds the new position when it returns.

use super::{api, Core, ADMIN};
use crate::common::v4;
use crate::hostile::{unique, OPEN_AUTH};
use serde_json::json;
use std::time::Duration;

async fn next_payloads(c: &mut v4::Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(String::from_utf8_lossy(&c.next_publish().await.payload).into_owned());
    }
    got
}

pub async fn a_session_reset_skips_its_backlog_or_replays_it_from_a_time(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{ADMIN}")).await;
    let parent = unique("opsr");
    let id = unique("reset-dev");
    let topic = format!("{parent}/t");
    let persistent = || {
        let mut o = v4::options(gw.addr(), &id);
        o.set_clean_session(false);
        o
    };
    let reset = |body: serde_json::Value| {
        let path = format!("/api/v1/sessions/{id}/reset");
        let gw = &gw;
        async move { api(gw, "POST", &path, Some(body)).await }
    };
    let mut device = v4::connect_with(persistent()).await;
    device.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(gw.addr(), &unique("reset-pub")).await;
    publisher.publish(&topic, v4::QoS::AtLeastOnce, false, b"seen").await;
    assert_eq!(&device.next_publish().await.payload[..], b"seen");

    // Connected: the client is disconnected, its session saved and then reset.
    let (status, body) = reset(json!({"to": "latest"})).await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(true)), "{body}");
    device.closed_by_server().await;

    for m in ["a-0", "a-1"] {
        publisher.publish(&topic, v4::QoS::AtLeastOnce, false, m.as_bytes()).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let from = lmq_gateway::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for m in ["b-0", "b-1"] {
        publisher.publish(&topic, v4::QoS::AtLeastOnce, false, m.as_bytes()).await;
    }
    let (status, body) = api(&gw, "GET", &format!("/api/v1/sessions/{id}"), None).await;
    assert_eq!((status, &body["backlog"]), (200, &json!(4)), "{body}");

    // `time`: from the first message stored at or after it.
    let (status, body) = reset(json!({"to": "time", "time_ms": from})).await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(false)), "{body}");
    let mut back = v4::connect_with(persistent()).await;
    assert_eq!(next_payloads(&mut back, 2).await, ["b-0", "b-1"]);
    assert!(back.no_publish(Duration::from_millis(500)).await, "only what was stored after the time");
    back.disconnect().await;

    // `latest`: nothing of the backlog.
    publisher.publish(&topic, v4::QoS::AtLeastOnce, false, b"c-0").await;
    let (status, body) = reset(json!({"to": "latest"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(api(&gw, "GET", &format!("/api/v1/sessions/{id}"), None).await.1["backlog"], 0);
    let mut back = v4::connect_with(persistent()).await;
    assert!(back.no_publish(Duration::from_millis(500)).await, "no backlog after a reset to latest");
    back.disconnect().await;

    // `earliest`: everything the core service holds, acknowledged or not.
    let (status, body) = reset(json!({"to": "earliest"})).await;
    assert_eq!(status, 200, "{body}");
    let mut again = v4::connect_with(persistent()).await;
    assert_eq!(next_payloads(&mut again, 6).await, ["seen", "a-0", "a-1", "b-0", "b-1", "c-0"]);
    again.disconnect().await;

    // What is not a reset.
    for bad in [json!({"to": "soon"}), json!({"to": "time"}), json!({"to": "latest", "time_ms": 1})] {
        let (status, body) = reset(bad.clone()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_reset")), "{bad}: {body}");
    }
    let (status, body) =
        api(&gw, "POST", &format!("/api/v1/sessions/{}/reset", unique("nobody")), Some(json!({"to": "latest"}))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("session_not_found")), "{body}");
    publisher.disconnect().await;
    gw.shutdown().await;
}
