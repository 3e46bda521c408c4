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
    assert_eq!(body["connected"], false, "{body}");
    assert_eq!(body["subscriptions"][0]["backlog"], 4, "{body}");
    // The oldest message not acknowledged is a-0, stored 1.2 s or more ago.
    let age = body["oldest_unacked_age_ms"].as_i64().unwrap_or(-1);
    assert!((1200..60_000).contains(&age), "age of a-0: {body}");

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
    let (_, body) = api(&gw, "GET", &format!("/api/v1/sessions/{id}"), None).await;
    assert_eq!((&body["backlog"], &body["oldest_unacked_age_ms"]), (&json!(0), &json!(null)), "{body}");
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

/// Two gateways on one cluster: a reset asked on one for a client connected to the other is
/// forwarded; that gateway disconnects the client, saves its session and applies the reset.
pub async fn a_reset_asked_on_one_gateway_reaches_the_client_connected_to_another(core: &Core) {
    let asked = core.start(&format!("{OPEN_AUTH}{ADMIN}")).await;
    let holder = core.start(&format!("{OPEN_AUTH}{ADMIN}")).await;
    let parent = unique("opsx");
    let id = unique("reset-far");
    let mut opts = v4::options(holder.addr(), &id);
    opts.set_clean_session(false);
    let mut device = v4::connect_with(opts).await;
    device.subscribe(&format!("{parent}/#"), v4::QoS::AtLeastOnce).await;
    let mut publisher = v4::connect(asked.addr(), &unique("reset-far-pub")).await;
    publisher.publish(&format!("{parent}/t"), v4::QoS::AtLeastOnce, false, b"m-0").await;
    assert_eq!(&device.next_publish().await.payload[..], b"m-0");
    // Let the holder save the acknowledgement, then replay from the start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) =
        api(&asked, "POST", &format!("/api/v1/sessions/{id}/reset"), Some(json!({"to": "earliest"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["disconnected"], &body["forwarded"]), (&json!(false), &json!(true)), "{body}");
    device.closed_by_server().await;
    // Back on the gateway that was asked: the acknowledged message comes again.
    let mut opts = v4::options(asked.addr(), &id);
    opts.set_clean_session(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut back = v4::connect_with(opts).await;
    assert_eq!(next_payloads(&mut back, 1).await, ["m-0"]);
    back.disconnect().await;
    publisher.disconnect().await;
    holder.shutdown().await;
    asked.shutdown().await;
}
