//! Message query through the admin API: by message ID (as returned in MQTT 5 PUBACKs), by
//! topic name or filter and time range, by key; pages with cursors; payloads cut to the
//! configured size; reserved topics and junk refused.

use super::{api, Core, ADMIN};
use crate::common::{publish_packet, raw_connect, Raw};
use crate::hostile::{unique, OPEN_AUTH};
use base64::Engine as _;
use lmq_gateway::protocol::{self as p, Packet, Protocol};
use serde_json::Value;
use std::time::Duration;

/// Publish `payload` at QoS 1 as an MQTT 5 client; the message ID from the PUBACK.
async fn publish(c: &mut Raw, pid: u16, topic: &str, payload: &str, user_properties: &[(&str, &str)]) -> String {
    let mut packet = publish_packet(pid, topic, p::QoS::AtLeastOnce, payload.as_bytes());
    if let Packet::Publish(ref mut pb) = packet {
        pb.properties.user_properties = user_properties.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
    }
    c.send(&packet).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.code.0, 0, "publish to {topic} refused");
            let id = a.properties.user_properties.iter().find(|(k, _)| k == "msgId").map(|(_, v)| v.clone());
            id.expect("msgId in the PUBACK")
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn payload_of(m: &Value) -> String {
    let b64 = m["payload_base64"].as_str().expect("payload_base64");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).expect("base64")).expect("utf8")
}

fn payloads(body: &Value) -> Vec<String> {
    body["messages"].as_array().expect("messages").iter().map(payload_of).collect()
}

fn query(parts: &[(&str, &str)]) -> String {
    let q: Vec<String> = parts.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect();
    format!("/api/v1/messages?{}", q.join("&"))
}

fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn messages_are_found_by_id_by_topic_and_time_and_by_key(core: &Core) {
    let gw = core.start(&format!("{OPEN_AUTH}{ADMIN}  query_max_payload_bytes: 6\n")).await;
    let parent = unique("opsq");
    let (a, b) = (unique("qa"), unique("qb"));
    let (mut pa, code) = raw_connect(gw.addr(), &a, Protocol::V5, None, None).await;
    assert_eq!(code, 0);
    let (mut pb, code) = raw_connect(gw.addr(), &b, Protocol::V5, None, None).await;
    assert_eq!(code, 0);

    let mut early = Vec::new();
    for i in 1..=3u16 {
        early.push(publish(&mut pa, i, &format!("{parent}/x"), &format!("early-{i}"), &[]).await);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mid = lmq_gateway::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut late = Vec::new();
    for i in 1..=3u16 {
        let props: &[(&str, &str)] = if i == 2 { &[("key", "order-7")] } else { &[] };
        late.push(publish(&mut pb, i, &format!("{parent}/y/{i}"), &format!("late-{i}-long-payload"), props).await);
    }

    // By ID: each message exactly, payload cut to 6 bytes.
    for (id, (who, text)) in early.iter().zip([(&a, "early-1"), (&a, "early-2"), (&a, "early-3")]) {
        let (status, m) = api(&gw, "GET", &format!("/api/v1/messages/{id}"), None).await;
        assert_eq!(status, 200, "{m}");
        assert_eq!(m["msgId"], id.as_str());
        assert_eq!(m["clientId"], who.as_str());
        assert_eq!(m["topic"], format!("{parent}/x"));
        assert_eq!(m["qos"], 1);
        assert_eq!(payload_of(&m), &text[..6]);
        assert_eq!(m["size"], text.len());
        assert_eq!(m["truncated"], true);
    }
    let (status, m) = api(&gw, "GET", &format!("/api/v1/messages/{}", late[1]), None).await;
    assert_eq!((status, m["topic"].as_str()), (200, Some(format!("{parent}/y/2").as_str())), "{m}");
    // An ID of the right shape that nobody was given, and junk.
    let unknown = format!("{}{}", &late[0][..12], "0".repeat(20));
    let (status, m) = api(&gw, "GET", &format!("/api/v1/messages/{unknown}"), None).await;
    assert_eq!((status, m["error"]["code"].as_str()), (404, Some("message_not_found")), "{m}");
    let (status, m) = api(&gw, "GET", "/api/v1/messages/not-an-id", None).await;
    assert_eq!((status, m["error"]["code"].as_str()), (400, Some("invalid_msg_id")), "{m}");

    // Topic filter and time range.
    let all = format!("{parent}/#");
    let (status, body) = api(&gw, "GET", &query(&[("topic", &all), ("from_ms", &mid.to_string())]), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(payloads(&body), ["late-1", "late-2", "late-3"].map(String::from), "{body}");
    let ids: Vec<&str> = body["messages"].as_array().unwrap().iter().map(|m| m["msgId"].as_str().unwrap()).collect();
    assert_eq!(ids, late.iter().map(String::as_str).collect::<Vec<_>>());
    let (_, body) = api(&gw, "GET", &query(&[("topic", &all), ("to_ms", &mid.to_string())]), None).await;
    assert_eq!(payloads(&body), ["early-", "early-", "early-"].map(String::from), "{body}");
    let (_, body) = api(&gw, "GET", &query(&[("topic", &format!("{parent}/x"))]), None).await;
    let ids: Vec<&str> = body["messages"].as_array().unwrap().iter().map(|m| m["msgId"].as_str().unwrap()).collect();
    assert_eq!(ids, early.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(body["next"], Value::Null);
    let (_, body) = api(&gw, "GET", &query(&[("topic", &format!("{parent}/+/3"))]), None).await;
    assert_eq!(payloads(&body), ["late-3"], "{body}");

    // Key: a user property `key`, or the record key (the publisher's ClientId by default).
    let (_, body) = api(&gw, "GET", &query(&[("topic", &all), ("key", "order-7")]), None).await;
    assert_eq!(payloads(&body), ["late-2"], "{body}");
    let (_, body) = api(&gw, "GET", &query(&[("topic", &all), ("key", &a)]), None).await;
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(3), "{body}");
    assert!(body["messages"].as_array().unwrap().iter().all(|m| m["clientId"] == a.as_str()));

    // Pages of two, in time order, each cursor going on where the last page stopped.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        assert!(page < 5, "more pages than messages");
        let mut parts = vec![("topic", all.clone()), ("limit", "2".to_string())];
        if let Some(c) = &cursor {
            parts.push(("cursor", c.clone()));
        }
        let parts: Vec<(&str, &str)> = parts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = api(&gw, "GET", &query(&parts), None).await;
        assert_eq!(status, 200, "{body}");
        let ids = body["messages"].as_array().unwrap();
        assert!(ids.len() <= 2);
        seen.extend(ids.iter().map(|m| m["msgId"].as_str().unwrap().to_owned()));
        match body["next"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = early.iter().chain(&late).cloned().collect();
    assert_eq!(seen, expected);

    // What is not a query.
    for (topic, code) in
        [("$share/g/x", "invalid_topic"), ("a/#/b", "invalid_topic"), (super::EVENTS_TOPIC, "reserved_topic")]
    {
        let (status, body) = api(&gw, "GET", &query(&[("topic", topic)]), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some(code)), "{topic}: {body}");
    }
    let (status, body) = api(&gw, "GET", &query(&[("topic", &all), ("cursor", "bm9wZQ")]), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_cursor")), "{body}");
    gw.shutdown().await;
}
