//! LMQ identity on the wire (SPEC §4): signature and token modes with the CONNACK codes of
//! MQTT 3.1.1 and 5.0, ACL refusals, and the token life cycle over `$SYS` topics.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;

use bytes::Bytes;
use common::{Raw, TestGateway};
use lmq_gateway::auth::signature::sign;
use lmq_gateway::auth::token::TokenType;
use lmq_gateway::protocol::{self as p, Packet, Protocol, ReasonCode};
use std::num::NonZeroU16;
use std::time::Duration;

const AUTH: &str = "auth:
  instance_id: inst-1
  access_keys:
    - id: ak-1
      secret: secret-1
      publish: [\"dev/#\", \"cmd\"]
      subscribe: [\"dev/#\", \"cmd/#\"]
";

fn connect(id: &str, protocol: Protocol, username: Option<&str>, password: Option<&str>) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: username.map(str::to_string),
        password: password.map(|s| Bytes::copy_from_slice(s.as_bytes())),
        properties: Default::default(),
    }))
}

/// CONNACK code as the client sees it: MQTT 5 reason code, or the 3.1.1 return code.
async fn connack(gw: &TestGateway, c: Packet, protocol: Protocol) -> (u8, Raw) {
    let mut raw = Raw::connect(gw.addr, protocol).await;
    raw.send(&c).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) if protocol == Protocol::V5 => (a.code.0, raw),
        Some(Packet::ConnAck(a)) => (a.code.to_v3_connack(), raw),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn signature_mode_accepts_the_right_password_and_refuses_the_rest() {
    let gw = TestGateway::start_with(AUTH).await;
    let id = "GID_dev@@@d1";
    let good = sign("secret-1", id);
    for (protocol, bad_pw, not_auth) in [(Protocol::V311, 4u8, 5u8), (Protocol::V5, 0x86, 0x87)] {
        let user = "Signature|ak-1|inst-1";
        assert_eq!(connack(&gw, connect(id, protocol, Some(user), Some(&good)), protocol).await.0, 0);
        // Wrong secret.
        let wrong = sign("not-the-secret", id);
        assert_eq!(connack(&gw, connect(id, protocol, Some(user), Some(&wrong)), protocol).await.0, bad_pw);
        // Password of another ClientId.
        let other = sign("secret-1", "GID_dev@@@d2");
        assert_eq!(connack(&gw, connect(id, protocol, Some(user), Some(&other)), protocol).await.0, bad_pw);
        // Unknown AccessKeyId, wrong instance.
        let c = connect(id, protocol, Some("Signature|ak-x|inst-1"), Some(&good));
        assert_eq!(connack(&gw, c, protocol).await.0, bad_pw);
        let c = connect(id, protocol, Some("Signature|ak-1|inst-2"), Some(&good));
        assert_ne!(connack(&gw, c, protocol).await.0, 0);
        // No user name while anonymous access is off.
        assert_eq!(connack(&gw, connect(id, protocol, None, None), protocol).await.0, not_auth);
        // ClientId that is not `<GroupId>@@@<DeviceId>`.
        let c = connect("plain-id", protocol, Some(user), Some(&sign("secret-1", "plain-id")));
        assert_eq!(connack(&gw, c, protocol).await.0, if protocol == Protocol::V5 { 0x85 } else { 2 });
    }
}

#[tokio::test]
async fn publish_and_subscribe_outside_the_acl_are_refused() {
    let gw = TestGateway::start_with(AUTH).await;
    let id = "GID_dev@@@acl";
    let (code, mut raw) = connack(
        &gw,
        connect(id, Protocol::V5, Some("Signature|ak-1|inst-1"), Some(&sign("secret-1", id))),
        Protocol::V5,
    )
    .await;
    assert_eq!(code, 0);
    raw.send(&Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        filters: vec![
            ("dev/+/x".into(), p::SubscriptionOptions { qos: p::QoS::AtLeastOnce, ..Default::default() }),
            ("#".into(), p::SubscriptionOptions { qos: p::QoS::AtLeastOnce, ..Default::default() }),
        ],
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::SubAck(s)) => assert_eq!(s.codes, vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]),
        other => panic!("{other:?}"),
    }
    let publish = |topic: &str, id: u16| {
        Packet::Publish(p::Publish {
            dup: false,
            qos: p::QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: NonZeroU16::new(id),
            payload: Bytes::from_static(b"x"),
            properties: Default::default(),
        })
    };
    raw.send(&publish("dev/1", 2)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
    raw.send(&publish("other/1", 3)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::NOT_AUTHORIZED));
    // P2P needs publish permission on the parent topic (`cmd` here).
    raw.send(&publish("cmd/p2p/GID_dev@@@x", 4)).await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
}

async fn token_client(gw: &TestGateway, id: &str, password: &str) -> (u8, Raw) {
    connack(gw, connect(id, Protocol::V311, Some("Token|ak-1|inst-1"), Some(password)), Protocol::V311).await
}

/// Next `$SYS` notice the client receives, as (topic, JSON).
async fn sys_notice(raw: &mut Raw) -> (String, serde_json::Value) {
    loop {
        match raw.recv().await {
            Some(Packet::Publish(p)) if p.topic.starts_with("$SYS/") => {
                return (p.topic, serde_json::from_slice(&p.payload).expect("JSON notice"));
            }
            Some(_) => {}
            None => panic!("closed before a $SYS notice"),
        }
    }
}

#[tokio::test]
async fn token_mode_life_cycle() {
    let gw = TestGateway::start_with(AUTH).await;
    let auth = gw.gateway().ctx.auth.clone();
    let keys = auth.keys();
    let rw = keys.issue_token("ak-1", &["dev/#".to_string()], TokenType::RW, 3600).unwrap();

    // Valid token: accepted; publishing inside the resources works.
    let (code, mut raw) = token_client(&gw, "GID_tok@@@1", &format!("RW|{}", rw.token)).await;
    assert_eq!(code, 0);

    // Forged (signature changed), and any-invalid-means-all-invalid.
    let mut forged = rw.token.clone();
    forged.pop();
    forged.push(if rw.token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(token_client(&gw, "GID_tok@@@2", &format!("RW|{forged}")).await.0, 4);
    assert_eq!(token_client(&gw, "GID_tok@@@2", &format!("R|{}|W|{forged}", rw.token)).await.0, 4);

    // Token for other topics: publishing there gets `$SYS/tokenInvalidNotice` and a disconnect.
    let other = keys.issue_token("ak-1", &["dev/a/#".to_string()], TokenType::W, 3600).unwrap();
    let (code, mut narrow) = token_client(&gw, "GID_tok@@@3", &format!("W|{}", other.token)).await;
    assert_eq!(code, 0);
    narrow
        .send(&Packet::Publish(p::Publish {
            dup: false,
            qos: p::QoS::AtMostOnce,
            retain: false,
            topic: "dev/b/1".into(),
            packet_id: None,
            payload: Bytes::from_static(b"x"),
            properties: Default::default(),
        }))
        .await;
    let (topic, body) = sys_notice(&mut narrow).await;
    assert_eq!(topic, "$SYS/tokenInvalidNotice");
    assert!(body["code"] == 4 || body["code"] == 5, "{body}");
    assert!(narrow.until_closed().await.is_empty());

    // Upload a new token without reconnecting, then revoke it: notice code 3, disconnect.
    let fresh = keys.issue_token("ak-1", &["dev/#".to_string()], TokenType::RW, 3600).unwrap();
    let upload = serde_json::json!({"token": fresh.token, "type": "RW"}).to_string();
    raw.send(&Packet::Publish(p::Publish {
        dup: false,
        qos: p::QoS::AtLeastOnce,
        retain: false,
        topic: "$SYS/uploadToken".into(),
        packet_id: NonZeroU16::new(7),
        payload: Bytes::from(upload),
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 7));
    // The old token's revocation no longer concerns this connection...
    auth.revoke_token(&rw.jti, rw.expire_ms).await.unwrap();
    raw.send(&Packet::PingReq).await;
    assert!(matches!(raw.recv().await, Some(Packet::PingResp)), "still connected with the uploaded token");
    // ...the new one's does.
    auth.revoke_token(&fresh.jti, fresh.expire_ms).await.unwrap();
    let (topic, body) = sys_notice(&mut raw).await;
    assert_eq!(topic, "$SYS/tokenInvalidNotice");
    assert_eq!(body["code"], 3);
    assert!(raw.until_closed().await.is_empty());

    // A revoked token is refused at CONNECT.
    assert_eq!(token_client(&gw, "GID_tok@@@4", &format!("RW|{}", fresh.token)).await.0, 4);
}

#[tokio::test]
async fn token_expiry_notice_comes_about_five_minutes_ahead() {
    let gw = TestGateway::start_with(AUTH).await;
    let keys = gw.gateway().ctx.auth.keys();
    // Expires in 5 min + 2 s: the notice is due in about 2 s.
    let t = keys.issue_token("ak-1", &["dev/#".to_string()], TokenType::R, 302).unwrap();
    let (code, mut raw) = token_client(&gw, "GID_tok@@@exp", &format!("R|{}", t.token)).await;
    assert_eq!(code, 0);
    let start = std::time::Instant::now();
    let (topic, body) = tokio::time::timeout(Duration::from_secs(8), sys_notice(&mut raw)).await.expect("notice");
    assert_eq!(topic, "$SYS/tokenExpireNotice");
    assert_eq!(body["expireTime"], t.expire_ms);
    assert_eq!(body["type"], "R");
    assert!(start.elapsed() >= Duration::from_millis(500), "not before it is due");
}

#[tokio::test]
async fn device_credential_mode_and_revocation() {
    let gw = TestGateway::start_with(AUTH).await;
    let auth = gw.gateway().ctx.auth.clone();
    let id = "GID_dev@@@cred1";
    let acl = lmq_gateway::auth::acl::Acl::new(vec!["dev/#".into()], vec!["dev/#".into()]).unwrap();
    let cred = auth.register_credential(id, acl).await.unwrap();
    let user = format!("DeviceCredential|{}|inst-1", cred.access_key_id);
    let good = sign(cred.secret.expose(), id);
    for (protocol, bad) in [(Protocol::V311, 4u8), (Protocol::V5, 0x86)] {
        let (code, _raw) = connack(&gw, connect(id, protocol, Some(&user), Some(&good)), protocol).await;
        assert_eq!(code, 0, "{protocol:?}");
        let wrong = sign("wrong", id);
        assert_eq!(connack(&gw, connect(id, protocol, Some(&user), Some(&wrong)), protocol).await.0, bad);
        // The credential is bound to its ClientId.
        let other = "GID_dev@@@cred2";
        let c = connect(other, protocol, Some(&user), Some(&sign(cred.secret.expose(), other)));
        assert_ne!(connack(&gw, c, protocol).await.0, 0);
    }
    // Revoked while connected: the connection is closed; new logins are refused.
    let (_, mut raw) = connack(&gw, connect(id, Protocol::V5, Some(&user), Some(&good)), Protocol::V5).await;
    auth.revoke_credential(&cred.access_key_id).await.unwrap();
    let seen = raw.until_closed().await;
    assert!(seen.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code.is_error())), "{seen:?}");
    assert_ne!(connack(&gw, connect(id, Protocol::V5, Some(&user), Some(&good)), Protocol::V5).await.0, 0);
}

#[tokio::test]
async fn expired_token_is_refused_at_connect() {
    let gw = TestGateway::start_with(AUTH).await;
    // Signed with the access key's secret but already past its `exp`.
    let now = lmq_gateway::now_ms() as u64 / 1000;
    let claims = serde_json::json!({
        "ak": "ak-1", "resources": ["dev/#"], "actions": ["R", "W"],
        "exp": now - 10, "iat": now - 100, "jti": "expired-1"
    });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"secret-1"),
    )
    .unwrap();
    let c = connect("GID_tok@@@old", Protocol::V5, Some("Token|ak-1|inst-1"), Some(&format!("RW|{token}")));
    assert_eq!(connack(&gw, c, Protocol::V5).await.0, 0x86);
}

#[tokio::test]
async fn client_id_of_64_characters_is_accepted_and_65_refused() {
    let gw = TestGateway::start().await;
    for protocol in [Protocol::V311, Protocol::V5] {
        let ok = format!("GID_len@@@{}", "d".repeat(64 - 10));
        let too_long = format!("{ok}x");
        assert_eq!(ok.chars().count(), 64);
        assert_eq!(connack(&gw, connect(&ok, protocol, None, None), protocol).await.0, 0);
        let refused = connack(&gw, connect(&too_long, protocol, None, None), protocol).await.0;
        assert_eq!(refused, if protocol == Protocol::V5 { 0x85 } else { 2 });
    }
}
