//! Admin HTTP API against a real gateway: authentication, JSON errors, clients, tokens,
//! device credentials, sending messages, and agreement with docs/admin-openapi.yaml.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{http, v4, Raw, TestGateway, ADMIN_TOKEN};
use lmq_gateway::auth::signature::sign;
use lmq_gateway::protocol::{self as p, Packet, Protocol, ReasonCode};
use serde_json::{json, Value};

const AUTH: &str = "auth:
  allow_anonymous: true
  allow_plain_client_ids: true
  instance_id: inst-a
  access_keys:
    - id: ak-a
      secret: secret-a
      publish: [\"adm/#\"]
      subscribe: [\"adm/#\"]
";

/// `METHOD path` with the admin token; returns status and JSON body (Null if none).
async fn call(gw: &TestGateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_with(gw, method, path, body, Some(ADMIN_TOKEN)).await
}

async fn call_with(
    gw: &TestGateway,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = http().request(method, format!("{}{path}", gw.admin_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The stable error shape, with this code.
fn is_error(body: &Value, code: &str) -> bool {
    body["error"]["code"] == code && body["error"]["message"].is_string()
}

fn connect(id: &str, protocol: Protocol, user: Option<&str>, password: Option<&str>) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: user.map(str::to_string),
        password: password.map(|s| Bytes::copy_from_slice(s.as_bytes())),
        properties: Default::default(),
    }))
}

async fn connack(gw: &TestGateway, c: Packet, protocol: Protocol) -> (ReasonCode, Raw) {
    let mut raw = Raw::connect(gw.addr, protocol).await;
    raw.send(&c).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => (a.code, raw),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn token_is_required_and_errors_are_json() {
    let gw = TestGateway::start_admin("").await;
    for token in [None, Some("wrong")] {
        let (status, body) = call_with(&gw, "GET", "/api/v1/clients", None, token).await;
        assert_eq!(status, 401);
        assert!(is_error(&body, if token.is_none() { "missing_token" } else { "invalid_token" }), "{body}");
    }
    // Probes need no token.
    let (status, body) = call_with(&gw, "GET", "/healthz", None, None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = call_with(&gw, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["ready"], true);
    assert_eq!(body["core_service"]["kind"], "embedded");
    // Bad input.
    let r = http()
        .post(format!("{}/api/v1/messages", gw.admin_url()))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(is_error(&r.json::<Value>().await.unwrap(), "invalid_body"));
    let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(json!({"topic": "a/b", "colour": 1}))).await;
    assert_eq!(status, 400, "unknown fields are refused");
    assert!(is_error(&body, "invalid_body"), "{body}");
    let (status, body) = call(&gw, "GET", "/nowhere", None).await;
    assert_eq!(status, 404);
    assert!(is_error(&body, "unknown_path"));
}

#[tokio::test]
async fn no_configured_token_turns_the_management_routes_off_but_not_probes_and_metrics() {
    let gw = TestGateway::start_with(
        "admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token_env: LMQ_TEST_UNSET_ADMIN_TOKEN\n",
    )
    .await;
    let (status, body) = call(&gw, "GET", "/api/v1/clients", None).await;
    assert_eq!(status, 401);
    assert!(is_error(&body, "admin_token_not_configured"), "{body}");
    assert_eq!(call_with(&gw, "GET", "/healthz", None, None).await.0, 200);
    assert_eq!(call_with(&gw, "GET", "/metrics", None, None).await.0, 200);
}

#[tokio::test]
async fn clients_are_listed_looked_up_and_kicked() {
    let gw = TestGateway::start_admin("").await;
    let (code, mut raw) = connack(&gw, connect("adm-kick", Protocol::V5, None, None), Protocol::V5).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let _other = v4::connect(gw.addr, "adm-other").await;

    let (status, body) = call(&gw, "GET", "/api/v1/clients", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 2);
    let ids: Vec<&str> = body["clients"].as_array().unwrap().iter().filter_map(|c| c["client_id"].as_str()).collect();
    assert_eq!(ids, vec!["adm-kick", "adm-other"]);

    let (status, c) = call(&gw, "GET", "/api/v1/clients/adm-kick", None).await;
    assert_eq!(status, 200);
    assert_eq!((c["protocol"].as_str(), c["listener"].as_str()), (Some("5.0"), Some("tcp")));
    assert_eq!((c["client_ip"].as_str(), c["transport"].as_str()), (Some("127.0.0.1"), Some("tcp")));

    let (status, body) = call(&gw, "DELETE", "/api/v1/clients/adm-kick", None).await;
    assert_eq!((status, &body["kicked"]), (200, &json!(true)));
    let seen = raw.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == ReasonCode::ADMINISTRATIVE_ACTION)),
        "{seen:?}"
    );
    // The status event says why.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let events = gw.status_events().await;
        if events.iter().any(|(t, b)| t == "tcpclean" && b["clientId"] == "adm-kick" && b["reason"] == "kicked") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no tcpclean with reason kicked: {events:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // It leaves the list right after its tcpclean is written.
    let (status, body) = loop {
        let (status, body) = call(&gw, "GET", "/api/v1/clients/adm-kick", None).await;
        if status != 200 || tokio::time::Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status, 404);
    assert!(is_error(&body, "client_not_found"));
    assert_eq!(call(&gw, "DELETE", "/api/v1/clients/adm-kick", None).await.0, 404);
}

#[tokio::test]
async fn messages_reach_subscribers_and_p2p_targets() {
    let gw = TestGateway::start_admin("").await;
    let mut sub = v4::connect(gw.addr, "adm-sub").await;
    sub.subscribe("adm/#", v4::QoS::AtLeastOnce).await;
    let mut target = v4::connect(gw.addr, "adm-target").await;

    let (status, body) =
        call(&gw, "POST", "/api/v1/messages", Some(json!({"topic": "adm/news", "payload": "hello"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["core_topic"], "adm");
    let m = sub.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("adm/news", &b"hello"[..]));
    assert_eq!(m.qos, v4::QoS::AtLeastOnce);

    // P2P: only the target gets it, without a subscription.
    let msg =
        json!({"client_id": "adm-target", "parent": "adm", "payload": "AAEC", "payload_encoding": "base64", "qos": 0});
    let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(msg)).await;
    assert_eq!(status, 200, "{body}");
    let m = target.next_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("adm/p2p/adm-target", &[0u8, 1, 2][..]));

    for (bad, code) in [
        (json!({"topic": "adm/+", "payload": "x"}), "invalid_topic"),
        (json!({"topic": "$SYS/x"}), "invalid_topic"),
        (json!({"topic": "adm/x", "client_id": "c", "parent": "adm"}), "invalid_request"),
        (json!({"client_id": "c"}), "invalid_request"),
        (json!({"topic": "adm/x", "qos": 3}), "invalid_qos"),
        (json!({"topic": "adm/x", "payload": "%%", "payload_encoding": "base64"}), "invalid_payload"),
        (json!({"topic": format!("adm/{}", "x".repeat(70))}), "topic_too_long"),
    ] {
        let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(is_error(&body, code), "{bad}: {body}");
    }
    let big = json!({"topic": "adm/big", "payload": "x".repeat(70_000)});
    let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(big)).await;
    assert_eq!(status, 413);
    assert!(is_error(&body, "payload_too_large"));
    assert!(sub.no_publish(std::time::Duration::from_millis(200)).await);
}

#[tokio::test]
async fn undeclared_parents_are_refused() {
    let gw = TestGateway::start_admin("topics:\n  parents:\n    - name: adm\n").await;
    let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(json!({"topic": "other/x"}))).await;
    assert_eq!(status, 400);
    assert!(is_error(&body, "undeclared_parent"), "{body}");
}

#[tokio::test]
async fn reserved_topics_are_refused() {
    // With parent `*` (the default), the events topic is still not a message topic.
    let gw = TestGateway::start_admin("").await;
    for topic in ["GID_LMQ_STATUS", "lmq-sessions/x"] {
        let (status, body) = call(&gw, "POST", "/api/v1/messages", Some(json!({"topic": topic}))).await;
        assert_eq!(status, 400, "{topic}");
        assert!(is_error(&body, "reserved_topic"), "{topic}: {body}");
    }
    let events = gw.status_events().await;
    assert!(events.is_empty(), "nothing written to the events topic: {events:?}");
}

#[tokio::test]
async fn issued_token_connects_and_revoking_it_disconnects() {
    let gw = TestGateway::start_admin(AUTH).await;
    let req = json!({"access_key_id": "ak-a", "resources": ["adm/#"], "actions": "RW", "ttl_secs": 600});
    let (status, t) = call(&gw, "POST", "/api/v1/tokens", Some(req)).await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["username"], "Token|ak-a|inst-a");
    let (user, pw) = (t["username"].as_str().unwrap(), t["password"].as_str().unwrap());
    let (code, mut raw) =
        connack(&gw, connect("GID_adm@@@tok", Protocol::V311, Some(user), Some(pw)), Protocol::V311).await;
    assert_eq!(code, ReasonCode::SUCCESS);

    let jti = t["jti"].as_str().unwrap();
    let (status, body) = call(&gw, "DELETE", &format!("/api/v1/tokens/{jti}"), None).await;
    assert_eq!((status, &body["revoked"]), (200, &json!(true)), "{body}");
    let seen = raw.until_closed().await;
    assert!(
        seen.iter().any(|p| matches!(p, Packet::Publish(m) if m.topic == "$SYS/tokenInvalidNotice")),
        "told why before the disconnect: {seen:?}"
    );
    // Refused from now on.
    let (code, _) = connack(&gw, connect("GID_adm@@@tok", Protocol::V5, Some(user), Some(pw)), Protocol::V5).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    for (bad, status, code) in [
        (json!({"access_key_id": "nobody", "resources": ["adm/#"]}), 404, "unknown_access_key"),
        (json!({"access_key_id": "ak-a", "resources": ["adm/#"], "actions": "X"}), 400, "invalid_actions"),
        (json!({"access_key_id": "ak-a", "resources": ["other/#"]}), 400, "not_permitted"),
        (json!({"access_key_id": "ak-a", "resources": ["adm/#"], "ttl_secs": 1}), 400, "invalid_ttl"),
        (json!({"access_key_id": "ak-a", "resources": []}), 400, "invalid_resources"),
        (json!({"resources": ["adm/#"]}), 400, "invalid_body"),
    ] {
        let (s, body) = call(&gw, "POST", "/api/v1/tokens", Some(bad.clone())).await;
        assert_eq!(s, status, "{bad}: {body}");
        assert!(is_error(&body, code), "{bad}: {body}");
    }
    let (s, body) = call(&gw, "DELETE", &format!("/api/v1/tokens/{}", "j".repeat(200)), None).await;
    assert_eq!(s, 400);
    assert!(is_error(&body, "invalid_request"), "{body}");
    let (s, body) = call(&gw, "DELETE", "/api/v1/tokens/abc?expire_ms=soon", None).await;
    assert_eq!(s, 400);
    assert!(is_error(&body, "invalid_query"), "{body}");
}

#[tokio::test]
async fn registered_credential_connects_and_revoking_it_disconnects() {
    let gw = TestGateway::start_admin(AUTH).await;
    let id = "GID_adm@@@dev1";
    let req = json!({"client_id": id, "publish": ["adm/#"], "subscribe": ["adm/#"]});
    let (status, c) = call(&gw, "POST", "/api/v1/credentials", Some(req)).await;
    assert_eq!(status, 201, "{c}");
    let ak = c["access_key_id"].as_str().unwrap().to_string();
    assert_eq!(c["username"], format!("DeviceCredential|{ak}|inst-a"));
    let password = sign(c["secret"].as_str().unwrap(), id);
    let user = c["username"].as_str().unwrap();
    let (code, mut raw) = connack(&gw, connect(id, Protocol::V5, Some(user), Some(&password)), Protocol::V5).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    // Bound to its ClientId.
    let (code, _) = connack(
        &gw,
        connect(
            "GID_adm@@@dev2",
            Protocol::V5,
            Some(user),
            Some(&sign(c["secret"].as_str().unwrap(), "GID_adm@@@dev2")),
        ),
        Protocol::V5,
    )
    .await;
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);

    let (status, body) = call(&gw, "DELETE", &format!("/api/v1/credentials/{ak}"), None).await;
    assert_eq!((status, &body["revoked"]), (200, &json!(true)));
    raw.until_closed().await;
    let (code, _) = connack(&gw, connect(id, Protocol::V5, Some(user), Some(&password)), Protocol::V5).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let (status, body) = call(&gw, "DELETE", &format!("/api/v1/credentials/{ak}"), None).await;
    assert_eq!(status, 404);
    assert!(is_error(&body, "credential_not_found"));

    let (status, body) = call(&gw, "POST", "/api/v1/credentials", Some(json!({"client_id": "bad/id"}))).await;
    assert_eq!(status, 400);
    assert!(is_error(&body, "invalid_request"), "{body}");
    let bad_acl = json!({"client_id": id, "publish": ["a/#/b"]});
    let (status, body) = call(&gw, "POST", "/api/v1/credentials", Some(bad_acl)).await;
    assert_eq!(status, 400);
    assert!(is_error(&body, "invalid_acl"), "{body}");
}

/// Every documented operation is routed and answers with a documented status; every route
/// is documented; undocumented methods answer 405.
#[tokio::test]
async fn openapi_document_and_routes_agree() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-openapi.yaml");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let paths = doc["paths"].as_mapping().expect("paths");
    let gw = TestGateway::start_admin(AUTH).await;
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];

    let mut documented = Vec::new();
    for (p, item) in paths {
        let p = p.as_str().unwrap().to_string();
        let concrete =
            p.replace("{client_id}", "nobody").replace("{jti}", "no-such-jti").replace("{access_key_id}", "DAKNONE");
        for m in methods {
            let Some(op) = item.get(m.to_lowercase()) else {
                let (status, body) = call(&gw, m, &concrete, Some(json!({}))).await;
                assert_eq!(status, 405, "{m} {p} is not documented, so it must not be routed");
                assert!(is_error(&body, "method_not_allowed"), "{m} {p}: {body}");
                continue;
            };
            documented.push((m.to_string(), p.clone()));
            let codes: Vec<u16> = op["responses"]
                .as_mapping()
                .expect("responses")
                .keys()
                .filter_map(|k| k.as_str().and_then(|s| s.parse().ok()))
                .collect();
            let body = (m == "POST").then(|| json!({}));
            let (status, answer) = call(&gw, m, &concrete, body.clone()).await;
            assert!(codes.contains(&status), "{m} {p} answered {status}, documented {codes:?}: {answer}");
            if status >= 400 {
                assert!(answer["error"]["code"].is_string(), "{m} {p}: error shape: {answer}");
            }
            let open = op.get("security").and_then(|s| s.as_sequence()).is_some_and(|s| s.is_empty());
            if !open {
                assert!(codes.contains(&401), "{m} {p} needs the token: document 401");
                let (status, answer) = call_with(&gw, m, &concrete, body, None).await;
                assert_eq!(status, 401, "{m} {p} without a token");
                assert!(is_error(&answer, "missing_token"));
            }
        }
    }
    let mut routed: Vec<(String, String)> =
        lmq_gateway::admin::routes().into_iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    routed.sort();
    documented.sort();
    assert_eq!(routed, documented, "routes and docs/admin-openapi.yaml differ");
}

#[tokio::test]
async fn healthcheck_command_probes_healthz() {
    let gw = TestGateway::start_admin("").await;
    let run = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
            .args(["healthcheck", "--url", &url, "--timeout-secs", "2"])
            .output()
            .expect("run lmq-gateway healthcheck")
    };
    let url = format!("{}/healthz", gw.admin_url());
    let ok = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // A path that is not healthy, and a port nobody listens on.
    let url = format!("{}/nowhere", gw.admin_url());
    let bad = tokio::task::spawn_blocking(move || run(url)).await.unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = tokio::task::spawn_blocking(move || run(format!("http://{closed}/healthz"))).await.unwrap();
    assert_eq!(down.status.code(), Some(1));
}

#[tokio::test]
async fn a_taken_admin_port_stops_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners:\n  - name: tcp\n    bind: 127.0.0.1:0\ncore:\n  embedded:\n    data_dir: {}\nadmin:\n  enabled: true\n  bind: {}\n",
        dir.path().display(),
        taken.local_addr().unwrap()
    );
    let config = lmq_gateway::config::Config::from_yaml(&yaml).unwrap();
    let err = lmq_gateway::gateway::Gateway::start(config).await.err().expect("start fails");
    assert!(err.to_string().contains("admin API cannot bind"), "{err}");
}

/// A client that trickles a request's headers is disconnected after the header-read timeout,
/// and connections beyond the cap are closed at once; the API keeps answering others.
#[tokio::test]
async fn slow_and_excess_admin_connections_are_cut_off() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(
        "admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  max_connections: 4\n  header_read_timeout_secs: 1\n",
    )
    .await;
    let addr = gw.gateway().admin_addr().expect("admin API enabled");

    // Slowloris: half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a trickling client held its connection for 5 s");
    assert!(started.elapsed() < Duration::from_secs(4), "closed only after {:?}", started.elapsed());
    drop(slow);

    // Four idle connections fill the cap; a fifth is closed without an answer.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(800), fifth.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "answered beyond the connection cap: {}", String::from_utf8_lossy(&answer));

    // Once they are gone (closed by the header timeout too), the API answers again.
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if call_with(&gw, "GET", "/healthz", None, None).await.0 == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "admin API did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stored_sessions_are_looked_up_with_their_backlog_and_deleted() {
    let gw = TestGateway::start_admin("").await;
    // A persistent session subscribed to sess/#, then offline while 3 messages arrive.
    let mut device = v4::connect_with({
        let mut o = v4::options(gw.addr, "adm-sess");
        o.set_clean_session(false);
        o
    })
    .await;
    device.subscribe("sess/#", v4::QoS::AtLeastOnce).await;
    let (status, body) = call(&gw, "DELETE", "/api/v1/sessions/adm-sess", None).await;
    assert_eq!(status, 409, "connected here: {body}");
    assert!(is_error(&body, "session_connected"));
    device.disconnect().await;
    wait_gone(&gw, "adm-sess").await;
    let mut publisher = v4::connect(gw.addr, "adm-sess-pub").await;
    for i in 0..3 {
        publisher.publish("sess/t", v4::QoS::AtLeastOnce, false, format!("m{i}").as_bytes()).await;
    }
    let (status, body) = call(&gw, "GET", "/api/v1/sessions/adm-sess", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connected_here"], false);
    assert_eq!(body["subscriptions"][0]["filter"], "sess/#");
    assert_eq!(body["backlog"], 3, "{body}");
    // Deleted: the client's next CONNECT finds no session and none of the backlog.
    let (status, body) = call(&gw, "DELETE", "/api/v1/sessions/adm-sess", None).await;
    assert_eq!((status, body["deleted"].as_bool()), (200, Some(true)));
    let (status, body) = call(&gw, "GET", "/api/v1/sessions/adm-sess", None).await;
    assert_eq!(status, 404);
    assert!(is_error(&body, "session_not_found"));
    let mut back = v4::connect_with({
        let mut o = v4::options(gw.addr, "adm-sess");
        o.set_clean_session(false);
        o
    })
    .await;
    assert!(back.no_publish(std::time::Duration::from_millis(500)).await, "no backlog after the delete");
}

/// Wait (at most 5 s) until `client_id` is no longer connected to the gateway.
async fn wait_gone(gw: &TestGateway, client_id: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while call(gw, "GET", &format!("/api/v1/clients/{client_id}"), None).await.0 != 404 {
        assert!(tokio::time::Instant::now() < deadline, "`{client_id}` still connected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
