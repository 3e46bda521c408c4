//! Sessions belong to identities (SPEC §8), tried as an attacker with an ordinary key would:
//! a client of another identity using a victim's ClientId gets a fresh session and none of
//! the victim's offline messages; restored subscriptions and a token upload are re-checked
//! against the current rights.

mod common;

use bytes::Bytes;
use common::{Raw, TestGateway};
use lmq_gateway::auth::signature::sign;
use lmq_gateway::auth::token::TokenType;
use lmq_gateway::protocol::{self as p, Packet, Protocol, QoS, ReasonCode};
use std::num::NonZeroU16;
use std::time::Duration;

const AUTH: &str = "auth:
  instance_id: inst-1
  access_keys:
    - id: ak-1
      secret: secret-1
      publish: [\"demo/#\", \"other/#\"]
      subscribe: [\"demo/#\", \"other/#\"]
";

const VICTIM: &str = "GID_dev@@@victim";

fn connect(id: &str, clean: bool, username: &str, password: &str) -> Packet {
    Packet::Connect(Box::new(p::Connect {
        protocol: Protocol::V5,
        clean_start: clean,
        keep_alive: 30,
        client_id: id.into(),
        will: None,
        username: Some(username.into()),
        password: Some(Bytes::copy_from_slice(password.as_bytes())),
        properties: p::ConnectProperties { session_expiry_interval: Some(3600), ..Default::default() },
    }))
}

/// Connect; returns (reason code, session present, client).
async fn open(gw: &TestGateway, c: Packet) -> (ReasonCode, bool, Raw) {
    let mut raw = Raw::connect(gw.addr, Protocol::V5).await;
    raw.send(&c).await;
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => (a.code, a.session_present, raw),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn signed(gw: &TestGateway, id: &str, clean: bool) -> (ReasonCode, bool, Raw) {
    open(gw, connect(id, clean, "Signature|ak-1|inst-1", &sign("secret-1", id))).await
}

async fn token(gw: &TestGateway, id: &str, clean: bool, password: &str) -> (ReasonCode, bool, Raw) {
    open(gw, connect(id, clean, "Token|ak-1|inst-1", password)).await
}

async fn subscribe(raw: &mut Raw, filters: &[&str]) {
    raw.send(&Packet::Subscribe(p::Subscribe {
        packet_id: NonZeroU16::new(1).expect("non-zero"),
        filters: filters
            .iter()
            .map(|f| ((*f).to_string(), p::SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() }))
            .collect(),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::SubAck(a)) => assert!(a.codes.iter().all(|c| c.0 <= 2), "SUBACK {:?}", a.codes),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

async fn publish(raw: &mut Raw, topic: &str, payload: &str, id: u16) {
    raw.send(&Packet::Publish(p::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: Default::default(),
    }))
    .await;
    match raw.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::SUCCESS, "PUBACK for {topic}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Payloads of the PUBLISHes that reach `raw` within `wait` (acknowledging QoS 1 ones).
async fn received(raw: &mut Raw, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while let Some(packet) = raw.recv().await {
            if let Packet::Publish(m) = packet {
                got.push(String::from_utf8_lossy(&m.payload).into_owned());
                if let Some(id) = m.packet_id {
                    raw.send(&Packet::PubAck(p::PubResponse::new(id))).await;
                }
            }
        }
    })
    .await;
    got
}

async fn disconnect(mut raw: Raw) {
    raw.send(&Packet::Disconnect(Default::default())).await;
    let _ = raw.until_closed().await;
}

/// A victim's persistent session with a subscription and offline messages waiting.
async fn victim_with_offline_messages(gw: &TestGateway, victim: Raw, filter: &str, topic: &str) -> Vec<String> {
    let mut victim = victim;
    subscribe(&mut victim, &[filter]).await;
    disconnect(victim).await;
    let (code, _, mut publisher) = signed(gw, "GID_dev@@@pub", true).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let sent: Vec<String> = (0..3).map(|i| format!("secret-{i}")).collect();
    for (i, m) in sent.iter().enumerate() {
        publish(&mut publisher, topic, m, i as u16 + 1).await;
    }
    sent
}

#[tokio::test]
async fn another_identity_with_the_victims_client_id_gets_a_fresh_session_and_nothing_of_it() {
    let gw = TestGateway::start_with(AUTH).await;
    let auth = gw.gateway().ctx.auth.clone();
    let keys = auth.keys();
    let (code, _, victim) = signed(&gw, VICTIM, false).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    victim_with_offline_messages(&gw, victim, "demo/secret/#", "demo/secret/a").await;

    // An attacker with a token of the same account granting only `R` on `other/#` (token mode
    // binds no ClientId) connects with the victim's ClientId and asks for its session.
    let t = keys.issue_token("ak-1", &["other/#".to_string()], TokenType::R, 3600).expect("token");
    let (code, present, mut attacker) = token(&gw, VICTIM, false, &format!("R|{}", t.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(!present, "the victim's session was handed to another identity");
    let got = received(&mut attacker, Duration::from_millis(1500)).await;
    assert!(got.is_empty(), "the attacker received the victim's messages: {got:?}");
    disconnect(attacker).await;

    // The same holds across modes the other way round: the attacker's token session is not
    // the signature client's either.
    let (code, present, _victim) = signed(&gw, VICTIM, false).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(!present, "a session created in token mode was handed to a signature client");
}

#[tokio::test]
async fn restored_subscriptions_are_checked_against_the_rights_of_the_new_connection() {
    let gw = TestGateway::start_with(AUTH).await;
    let auth = gw.gateway().ctx.auth.clone();
    let keys = auth.keys();
    let id = "GID_dev@@@narrowed";
    let wide = keys.issue_token("ak-1", &["demo/#".to_string()], TokenType::R, 3600).expect("token");
    let (code, _, client) = token(&gw, id, false, &format!("R|{}", wide.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    victim_with_offline_messages(&gw, client, "demo/secret/#", "demo/secret/a").await;

    // The same account comes back with a token that no longer covers `demo/secret/#`.
    let narrow = keys.issue_token("ak-1", &["demo/public/#".to_string()], TokenType::R, 3600).expect("token");
    let (code, present, mut client) = token(&gw, id, false, &format!("R|{}", narrow.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(present, "the same identity keeps its session");
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert!(got.is_empty(), "messages of a subscription the token no longer allows: {got:?}");

    // Delivery itself works: a new subscription inside the rights receives.
    subscribe(&mut client, &["demo/public/#"]).await;
    let (_, _, mut publisher) = signed(&gw, "GID_dev@@@pub2", true).await;
    publish(&mut publisher, "demo/public/x", "public", 1).await;
    publish(&mut publisher, "demo/secret/a", "secret-late", 2).await;
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert_eq!(got, vec!["public".to_string()]);
}

#[tokio::test]
async fn a_token_upload_that_narrows_the_rights_removes_the_subscriptions_it_no_longer_covers() {
    let gw = TestGateway::start_with(AUTH).await;
    let auth = gw.gateway().ctx.auth.clone();
    let keys = auth.keys();
    let id = "GID_dev@@@upload";
    let wide = keys.issue_token("ak-1", &["demo/#".to_string()], TokenType::R, 3600).expect("token");
    let (code, _, mut client) = token(&gw, id, true, &format!("R|{}", wide.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    subscribe(&mut client, &["demo/secret/#", "demo/public/#"]).await;

    let narrow = keys.issue_token("ak-1", &["demo/public/#".to_string()], TokenType::R, 3600).expect("token");
    let upload = serde_json::json!({"token": narrow.token, "type": "R"}).to_string();
    client
        .send(&Packet::Publish(p::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "$SYS/uploadToken".into(),
            packet_id: NonZeroU16::new(9),
            payload: Bytes::from(upload),
            properties: Default::default(),
        }))
        .await;
    assert!(matches!(client.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 9));

    let (_, _, mut publisher) = signed(&gw, "GID_dev@@@pub3", true).await;
    publish(&mut publisher, "demo/secret/a", "secret", 1).await;
    publish(&mut publisher, "demo/public/a", "public", 2).await;
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert_eq!(got, vec!["public".to_string()], "only what the uploaded token covers");
}
