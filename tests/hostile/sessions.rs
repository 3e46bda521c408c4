//! Sessions belong to identities (SPEC §8), tried as an attacker with an ordinary key would: a
//! client of another identity (another auth mode, another account's key, a device credential)
//! using a victim's ClientId gets a fresh session and none of the victim's offline messages;
//! restored subscriptions and a token upload are re-checked against the current rights. The
//! sessions and their offline messages are stored in the core service under test.

use super::*;
use lmq_gateway::auth::acl::Acl;
use lmq_gateway::auth::token::TokenType;

/// A persistent session of `victim` (signature mode) subscribed to `filter`, left with three
/// offline messages on `topic`, which are returned.
async fn victim_with_offline_messages(addr: SocketAddr, victim: &str, filter: &str, topic: &str) -> Vec<String> {
    let (code, _, mut raw) = signed(addr, victim, false).await;
    assert_eq!(code, ReasonCode::SUCCESS, "the victim connects");
    subscribe(&mut raw, &[filter]).await;
    disconnect(raw).await;
    let publisher = unique("GID_dev@@@pub");
    let (code, _, mut publisher) = signed(addr, &publisher, true).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let sent: Vec<String> = (0..3).map(|i| unique(&format!("secret-{i}-"))).collect();
    for (i, m) in sent.iter().enumerate() {
        publish(&mut publisher, topic, m, i as u16 + 1).await;
    }
    disconnect(publisher).await;
    sent
}

async fn token(addr: SocketAddr, id: &str, clean: bool, password: &str) -> (ReasonCode, bool, Raw) {
    open(addr, persistent_connect(id, clean, "Token|ak|inst", password)).await
}

/// Every hijack attempt: an identity other than the session's owner connects with the
/// victim's ClientId, asks for its session (clean start 0), and must get neither the session
/// nor a message of it.
pub async fn another_identity_with_the_victims_client_id_gets_a_fresh_session_and_nothing_of_it(core: &Core) {
    let gw = core.start(AUTH).await;
    let addr = gw.addr();
    let auth = gw.ctx.auth.clone();
    let victim = unique("GID_dev@@@victim");
    let parent = unique("hijack");
    let (filter, topic) = (format!("{parent}/secret/#"), format!("{parent}/secret/a"));

    // The victim itself gets its offline messages back: there is something to steal.
    let sent = victim_with_offline_messages(addr, &victim, &filter, &topic).await;
    let (code, present, mut raw) = signed(addr, &victim, false).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(present, "the owner gets its session back");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::common::WAIT;
    while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
        got.extend(received(&mut raw, Duration::from_millis(200)).await);
    }
    assert_eq!(got, sent, "the owner receives its offline messages");
    disconnect(raw).await;

    // Attackers, each with the victim's ClientId: a token of the same account granting only
    // `R` on another topic (token mode binds no ClientId), the signature of another account's
    // key, and a device credential registered for the victim's ClientId.
    let t = auth.keys().issue_token("ak", &[format!("{parent}/other/#")], TokenType::R, 3600).expect("token");
    let credential = auth.register_credential(&victim, Acl::allow_all()).await.expect("credential registered");
    let attackers = [
        ("token mode", "Token|ak|inst".to_owned(), format!("R|{}", t.token)),
        ("another account's key", "Signature|ak-2|inst".to_owned(), sign("other-s3cret", &victim)),
        (
            "a device credential",
            format!("DeviceCredential|{}|inst", credential.access_key_id),
            sign(credential.secret.expose(), &victim),
        ),
    ];
    for (how, user, password) in attackers {
        // The victim's session, with messages waiting.
        victim_with_offline_messages(addr, &victim, &filter, &topic).await;

        let (code, present, mut attacker) = open(addr, persistent_connect(&victim, false, &user, &password)).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{how}: the attacker's own credentials are valid");
        assert!(!present, "{how}: the victim's session was handed to another identity");
        let got = received(&mut attacker, Duration::from_millis(1500)).await;
        assert!(got.is_empty(), "{how}: the attacker received the victim's messages: {got:?}");
        disconnect(attacker).await;

        // The other way round: the attacker's session is not the victim's either.
        let (code, present, raw) = signed(addr, &victim, false).await;
        assert_eq!(code, ReasonCode::SUCCESS);
        assert!(!present, "{how}: a session of another identity was handed to the signature client");
        disconnect(raw).await;
    }
    drop(gw);
}

pub async fn restored_subscriptions_are_checked_against_the_rights_of_the_new_connection(core: &Core) {
    let gw = core.start(AUTH).await;
    let addr = gw.addr();
    let keys = gw.ctx.auth.keys();
    let id = unique("GID_dev@@@narrowed");
    let parent = unique("narrow");
    let wide = keys.issue_token("ak", &[format!("{parent}/#")], TokenType::R, 3600).expect("token");
    let (code, _, mut client) = token(addr, &id, false, &format!("R|{}", wide.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    subscribe(&mut client, &[&format!("{parent}/secret/#")]).await;
    disconnect(client).await;
    let (_, _, mut publisher) = signed(addr, &unique("GID_dev@@@pub"), true).await;
    publish(&mut publisher, &format!("{parent}/secret/a"), "secret-offline", 1).await;

    // The same account comes back with a token that no longer covers `secret/#`.
    let narrow = keys.issue_token("ak", &[format!("{parent}/public/#")], TokenType::R, 3600).expect("token");
    let (code, present, mut client) = token(addr, &id, false, &format!("R|{}", narrow.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(present, "the same identity keeps its session");
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert!(got.is_empty(), "messages of a subscription the token no longer allows: {got:?}");

    // Delivery itself works: a new subscription inside the rights receives.
    subscribe(&mut client, &[&format!("{parent}/public/#")]).await;
    publish(&mut publisher, &format!("{parent}/public/x"), "public", 2).await;
    publish(&mut publisher, &format!("{parent}/secret/a"), "secret-late", 3).await;
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert_eq!(got, vec!["public".to_string()]);
    drop(gw);
}

pub async fn a_token_upload_that_narrows_the_rights_removes_the_subscriptions_it_no_longer_covers(core: &Core) {
    let gw = core.start(AUTH).await;
    let addr = gw.addr();
    let keys = gw.ctx.auth.keys();
    let id = unique("GID_dev@@@upload");
    let parent = unique("upload");
    let wide = keys.issue_token("ak", &[format!("{parent}/#")], TokenType::R, 3600).expect("token");
    let (code, _, mut client) = token(addr, &id, true, &format!("R|{}", wide.token)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    subscribe(&mut client, &[&format!("{parent}/secret/#"), &format!("{parent}/public/#")]).await;

    let narrow = keys.issue_token("ak", &[format!("{parent}/public/#")], TokenType::R, 3600).expect("token");
    let upload = serde_json::json!({"token": narrow.token, "type": "R"}).to_string();
    client.send(&crate::common::publish_packet(9, "$SYS/uploadToken", QoS::AtLeastOnce, upload.as_bytes())).await;
    assert!(matches!(client.recv().await, Some(Packet::PubAck(a)) if a.packet_id.get() == 9));

    let (_, _, mut publisher) = signed(addr, &unique("GID_dev@@@pub"), true).await;
    publish(&mut publisher, &format!("{parent}/secret/a"), "secret", 1).await;
    publish(&mut publisher, &format!("{parent}/public/a"), "public", 2).await;
    let got = received(&mut client, Duration::from_millis(1500)).await;
    assert_eq!(got, vec!["public".to_string()], "only what the uploaded token covers");
    drop(gw);
}
