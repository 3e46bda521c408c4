//! Authenticator tests through the embedded core service in a temporary directory.

use super::*;
use crate::backend::embedded::EmbeddedCore;
use crate::config::{EmbeddedConfig, FsyncPolicy};

const CONFIG: &str = "
instance_id: inst-1
access_keys:
  - {id: ak1, secret: ak1-secret-value, publish: ['a/#', 'p'], subscribe: ['a/#', 'b/+']}
  - {id: ak2, secret: ak2-secret-value, publish: ['#'], subscribe: ['#']}
";
const CID: &str = "GID_test@@@dev1";

async fn core(dir: &tempfile::TempDir) -> SharedCoreService {
    let cfg =
        EmbeddedConfig { data_dir: dir.path().to_owned(), fsync: FsyncPolicy::Never, ..EmbeddedConfig::default() };
    let core: SharedCoreService = EmbeddedCore::open(&cfg, "events").await.unwrap();
    core
}

async fn setup(yaml: &str) -> (tempfile::TempDir, SharedCoreService, Authenticator) {
    let dir = tempfile::tempdir().unwrap();
    let core = core(&dir).await;
    let config: AuthConfig = serde_yaml_ng::from_str(yaml).unwrap();
    let auth = Authenticator::start(&config, core.clone()).await.unwrap();
    (dir, core, auth)
}

fn req<'a>(client_id: &'a str, username: Option<&'a str>, password: Option<&'a [u8]>) -> AuthRequest<'a> {
    AuthRequest { client_id, username, password, tls_client_cn: None }
}

/// Mode, reason label, MQTT 5 reason code, MQTT 3.1.1 return code.
type Verdict = (AuthMode, &'static str, u8, u8);

fn fail(r: Result<Identity, AuthFailure>) -> Verdict {
    let f = r.unwrap_err();
    // Its counter exists at zero from the start (metrics).
    assert!(
        super::FAILURE_LABELS.contains(&(f.mode, f.reason)),
        "({:?}, {}) missing from FAILURE_LABELS",
        f.mode,
        f.reason
    );
    (f.mode, f.reason, f.reason_code().0, f.v3_return_code())
}

#[tokio::test]
async fn signature_mode() {
    let (_dir, _core, auth) = setup(CONFIG).await;
    let pw = signature::sign("ak1-secret-value", CID);
    let ok = auth.authenticate(&req(CID, Some("Signature|ak1|inst-1"), Some(pw.as_bytes()))).await.unwrap();
    assert_eq!((ok.mode, ok.access_key_id.as_deref()), (AuthMode::Signature, Some("ak1")));
    assert!(ok.check_publish("a/x").is_ok() && ok.check_publish("b/x").is_err());
    assert!(ok.check_subscribe("b/x").is_ok() && ok.check_subscribe("b/#").is_err());
    assert_eq!(ok.check_publish("z"), Err(Denied::plain()), "no token notice outside token mode");

    let s = AuthMode::Signature;
    let other = signature::sign("ak2-secret-value", CID);
    let cases: Vec<(AuthRequest, Verdict)> = vec![
        (req(CID, Some("Signature|ak1|inst-1"), Some(other.as_bytes())), (s, "bad_signature", 0x86, 4)),
        (req(CID, Some("Signature|nokey|inst-1"), Some(pw.as_bytes())), (s, "unknown_access_key", 0x86, 4)),
        (req(CID, Some("Signature|ak1|inst-2"), Some(pw.as_bytes())), (s, "instance_mismatch", 0x86, 4)),
        (req(CID, Some("Signature|ak1|inst-1"), None), (s, "missing_password", 0x86, 4)),
        (req(CID, Some("Signature|ak1|inst-1"), Some(b"\xff\x00\xfe")), (s, "bad_signature", 0x86, 4)),
        (req("GID_test@@@dev2", Some("Signature|ak1|inst-1"), Some(pw.as_bytes())), (s, "bad_signature", 0x86, 4)),
        (req("plain", Some("Signature|ak1|inst-1"), Some(pw.as_bytes())), (s, "client_id_invalid", 0x85, 2)),
        (req(CID, None, None), (AuthMode::Anonymous, "missing_username", 0x87, 5)),
        (req(CID, Some("Sig|ak1|inst-1"), Some(pw.as_bytes())), (AuthMode::Unknown, "bad_username", 0x86, 4)),
        (req(CID, Some("Signature|ak1"), Some(pw.as_bytes())), (AuthMode::Unknown, "bad_username", 0x86, 4)),
        (req(CID, Some("Signature|ak1|inst-1|x"), Some(pw.as_bytes())), (AuthMode::Unknown, "bad_username", 0x86, 4)),
    ];
    for (r, want) in cases {
        assert_eq!(fail(auth.authenticate(&r).await), want, "{r:?}");
    }
}

#[tokio::test]
async fn anonymous_and_plain_ids_when_allowed() {
    let (_dir, _core, auth) = setup(
        "allow_anonymous: true\nallow_plain_client_ids: true\nanonymous_acl: {publish: ['pub/#'], subscribe: []}\n",
    )
    .await;
    let id = auth.authenticate(&req("c1", None, None)).await.unwrap();
    assert_eq!(id.mode, AuthMode::Anonymous);
    assert!(id.check_publish("pub/x").is_ok() && id.check_subscribe("pub/x").is_err());
    assert_eq!(fail(auth.authenticate(&req("a b", None, None)).await).1, "client_id_invalid");
}

#[tokio::test]
async fn token_mode_all_or_nothing_and_acl_codes() {
    let (_dir, _core, auth) = setup(CONFIG).await;
    let keys = auth.keys();
    let r = keys.issue_token("ak1", &["a/#".into(), "b/+".into()], TokenType::R, 3600).unwrap();
    let w = keys.issue_token("ak1", &["a/x".into()], TokenType::W, 600).unwrap();
    let pw = format!("R|{}|W|{}", r.token, w.token);
    let id = auth.authenticate(&req(CID, Some("Token|ak1|inst-1"), Some(pw.as_bytes()))).await.unwrap();
    assert_eq!(id.mode, AuthMode::Token);
    assert_eq!(id.tokens.len(), 2);
    assert_eq!(id.next_expiry().map(|g| g.jti.as_str()), Some(w.jti.as_str()));
    assert!(id.check_subscribe("$share/g/a/+/c").is_ok());
    assert!(id.check_publish("a/x").is_ok());
    // Publishing where only the R token reaches: permission mismatch (5); nowhere: resource (4).
    let d = id.check_publish("a/y").unwrap_err();
    assert_eq!(d.token_invalid, Some(TokenInvalid::new(TokenInvalidCode::PermissionMismatch, Some(TokenType::R))));
    let d = id.check_publish("q").unwrap_err();
    assert_eq!(d.token_invalid.map(|t| t.code), Some(TokenInvalidCode::ResourceMismatch));
    assert_eq!(d.reason_code, ReasonCode::NOT_AUTHORIZED);
    // The access key's own permissions bound its tokens: `b/x` is not publishable by ak1.
    assert!(keys.issue_token("ak1", &["b/x".into()], TokenType::W, 600).is_err());
    // Expiry.
    assert!(id.expired(now_ms()).is_none());
    let d = id.expired(w.expire_ms).unwrap();
    assert_eq!(d.token_invalid, Some(TokenInvalid::new(TokenInvalidCode::Expired, Some(TokenType::W))));

    // One bad token spoils the password.
    let spoiled = format!("R|{}|W|{}x", r.token, w.token);
    let f = auth.authenticate(&req(CID, Some("Token|ak1|inst-1"), Some(spoiled.as_bytes()))).await.unwrap_err();
    assert_eq!((f.reason, f.reason_code()), ("bad_signature", ReasonCode::BAD_USER_NAME_OR_PASSWORD));
    // A token of another access key.
    let other = auth.keys().issue_token("ak2", &["a/#".into()], TokenType::R, 600).unwrap();
    let pw2 = format!("R|{}", other.token);
    let f = auth.authenticate(&req(CID, Some("Token|ak1|inst-1"), Some(pw2.as_bytes()))).await.unwrap_err();
    assert_ne!(f.reason, "ok");
    assert!(f.token_invalid.is_some());
    // Expired at CONNECT.
    let later = w.expire_ms + 1;
    let f = auth.authenticate_at(&req(CID, Some("Token|ak1|inst-1"), Some(pw.as_bytes())), later, None).unwrap_err();
    assert_eq!((f.mode, f.reason, f.v3_return_code()), (AuthMode::Token, "expired_token", 4));
    // R token used as W.
    let wrong = format!("W|{}", r.token);
    let f = auth.authenticate(&req(CID, Some("Token|ak1|inst-1"), Some(wrong.as_bytes()))).await.unwrap_err();
    assert_eq!((f.reason, f.reason_code()), ("permission_mismatch", ReasonCode::NOT_AUTHORIZED));
}

#[tokio::test]
async fn revoked_token_is_refused_and_announced() {
    let (_dir, _core, auth) = setup(CONFIG).await;
    let t = auth.keys().issue_token("ak2", &["x/#".into()], TokenType::RW, 3600).unwrap();
    let pw = format!("RW|{}", t.token);
    let r = req(CID, Some("Token|ak2|inst-1"), Some(pw.as_bytes()));
    let id = auth.authenticate(&r).await.unwrap();
    let mut rx = auth.revocations();
    auth.revoke_token(&t.jti, t.expire_ms).await.unwrap();
    assert_eq!(fail(auth.authenticate(&r).await).1, "revoked_token");
    let rev = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(rev, Revocation::Token { jti: t.jti.clone() });
    let d = id.affected_by(&rev).unwrap();
    assert_eq!(d.token_invalid.map(|t| t.notice_json()), Some(r#"{"code":3,"type":"RW"}"#.to_owned()));
    assert_eq!(auth.recheck(&id).await, Some(d));
    assert!(id.affected_by(&Revocation::Token { jti: "other".into() }).is_none());
}

#[tokio::test]
async fn expired_revocations_are_pruned_from_the_store() {
    let (_dir, core, auth) = setup(CONFIG).await;
    auth.revoke_token("old", 1_000).await.unwrap();
    auth.revoke_token("new", i64::MAX).await.unwrap();
    auth.inner.prune(2_000);
    assert!(!auth.is_token_revoked("old") && auth.is_token_revoked("new"));
    for _ in 0..100 {
        if core.get_state(StateStore::RevokedTokens, "old").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(core.get_state(StateStore::RevokedTokens, "old").await.unwrap(), None);
    assert!(core.get_state(StateStore::RevokedTokens, "new").await.unwrap().is_some());
}

#[tokio::test]
async fn upload_token_replaces_grants() {
    let (_dir, _core, auth) = setup(CONFIG).await;
    let keys = auth.keys();
    let r1 = keys.issue_token("ak2", &["old/#".into()], TokenType::R, 600).unwrap();
    let w1 = keys.issue_token("ak2", &["w/#".into()], TokenType::W, 600).unwrap();
    let pw = format!("R|{}|W|{}", r1.token, w1.token);
    let id = auth.authenticate(&req(CID, Some("Token|ak2|inst-1"), Some(pw.as_bytes()))).await.unwrap();
    let r2 = keys.issue_token("ak2", &["new/#".into()], TokenType::R, 3600).unwrap();
    let body = format!(r#"{{"token":"{}","type":"R"}}"#, r2.token);
    let id2 = auth.upload_token(&id, body.as_bytes()).unwrap();
    let jtis: Vec<&str> = id2.tokens.iter().map(|g| g.jti.as_str()).collect();
    assert_eq!(jtis, [w1.jti.as_str(), r2.jti.as_str()]);
    assert!(id2.check_subscribe("new/x").is_ok() && id2.check_subscribe("old/x").is_err());
    assert!(id2.check_publish("w/x").is_ok(), "the W grant is kept");
    // RW replaces everything.
    let rw = keys.issue_token("ak2", &["rw".into()], TokenType::RW, 3600).unwrap();
    let id3 = auth.upload_token(&id2, format!(r#"{{"token":"{}","type":"RW"}}"#, rw.token).as_bytes()).unwrap();
    assert_eq!(id3.tokens.len(), 1);
    assert!(id3.check_publish("w/x").is_err() && id3.check_publish("rw").is_ok());
    // Refusals.
    let bad = auth.upload_token(&id, br#"{"token":"junk","type":"W"}"#).unwrap_err();
    assert_eq!(bad.notice_json(), r#"{"code":1,"type":"W"}"#);
    assert_eq!(auth.upload_token(&id, b"not json").unwrap_err().code, TokenInvalidCode::Forged);
    let wrong_type = format!(r#"{{"token":"{}","type":"W"}}"#, r2.token);
    assert_eq!(auth.upload_token(&id, wrong_type.as_bytes()).unwrap_err().code, TokenInvalidCode::PermissionMismatch);
    let sig = auth
        .authenticate(&req(
            CID,
            Some("Signature|ak2|inst-1"),
            Some(signature::sign("ak2-secret-value", CID).as_bytes()),
        ))
        .await
        .unwrap();
    assert!(auth.upload_token(&sig, body.as_bytes()).is_err(), "only token-mode clients upload tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_credentials_converge_across_gateways() {
    let (_dir, core, gw1) = setup(CONFIG).await;
    let config: AuthConfig = serde_yaml_ng::from_str(CONFIG).unwrap();
    let gw2 = Authenticator::start(&config, core.clone()).await.unwrap();
    let acl = Acl::new(vec!["dev/#".into()], vec!["cmd/+".into()]).unwrap();
    let cred = gw1.register_credential(CID, acl).await.unwrap();
    assert!(!format!("{cred:?}").contains(cred.secret.expose()));
    let user = format!("DeviceCredential|{}|inst-1", cred.access_key_id);
    let pw = signature::sign(cred.secret.expose(), CID);
    let r = req(CID, Some(&user), Some(pw.as_bytes()));

    let id = gw1.authenticate(&r).await.unwrap();
    assert_eq!((id.mode, id.access_key_id.as_deref()), (AuthMode::DeviceCredential, Some(cred.access_key_id.as_str())));
    assert!(id.check_publish("dev/1").is_ok() && id.check_publish("cmd/1").is_err());
    assert!(gw2.has_credential(&cred.access_key_id).await.unwrap(), "the second gateway sees the credential");
    let id2 = gw2.authenticate(&r).await.unwrap();
    assert_eq!(id2, id);

    // Bound to its ClientId; wrong secret refused.
    let other_pw = signature::sign(cred.secret.expose(), "GID_test@@@dev2");
    assert_eq!(
        fail(gw1.authenticate(&req("GID_test@@@dev2", Some(&user), Some(other_pw.as_bytes()))).await).1,
        "client_id_mismatch"
    );
    assert_eq!(fail(gw1.authenticate(&req(CID, Some(&user), Some(b"AAAA"))).await).1, "bad_signature");

    // A third gateway started later reads it from the core service.
    let gw3 = Authenticator::start(&config, core.clone()).await.unwrap();
    assert!(gw3.authenticate(&r).await.is_ok());

    let mut rx2 = gw2.revocations();
    gw1.revoke_credential(&cred.access_key_id).await.unwrap();
    assert_eq!(fail(gw1.authenticate(&r).await).1, "unknown_access_key");
    let rev = tokio::time::timeout(Duration::from_secs(5), rx2.recv()).await.unwrap().unwrap();
    assert_eq!(rev, Revocation::Credential { access_key_id: cred.access_key_id.clone() });
    assert_eq!(id2.affected_by(&rev).map(|d| d.reason), Some("revoked_credential"));
    assert_eq!(fail(gw2.authenticate(&r).await).1, "unknown_access_key");
    assert!(gw2.recheck(&id2).await.is_some());
    assert!(gw1.register_credential("no spaces allowed", Acl::default()).await.is_err());
    core.shutdown().await;
}

#[tokio::test]
async fn debug_output_has_no_secrets() {
    let (_dir, _core, auth) = setup(CONFIG).await;
    let pw = signature::sign("ak1-secret-value", CID);
    let r = req(CID, Some("Signature|ak1|inst-1"), Some(pw.as_bytes()));
    let id = auth.authenticate(&r).await.unwrap();
    let t = auth.keys().issue_token("ak1", &["a/#".into()], TokenType::R, 600).unwrap();
    let tpw = format!("R|{}", t.token);
    let tid = auth.authenticate(&req(CID, Some("Token|ak1|inst-1"), Some(tpw.as_bytes()))).await.unwrap();
    let outputs =
        [format!("{id:?}"), format!("{tid:?}"), format!("{r:?}"), format!("{auth:?}"), format!("{:?}", auth.keys())];
    for out in outputs {
        for secret in ["ak1-secret-value", "ak2-secret-value", pw.as_str(), t.token.as_str()] {
            assert!(!out.contains(secret), "secret in {out}");
        }
    }
}

#[tokio::test]
async fn mqtt_names_accept_any_client_id_and_wildcard_grants_cover_dollar_topics() {
    let dir = tempfile::tempdir().unwrap();
    let core = core(&dir).await;
    let yaml = "allow_anonymous: true\nanonymous_acl: {publish: ['#'], subscribe: ['#']}\n";
    let mut config: AuthConfig = serde_yaml_ng::from_str(yaml).unwrap();
    // LMQ names: a ClientId with a space is refused, and `#` does not grant `$` topics.
    let lmq = Authenticator::start(&config, core.clone()).await.unwrap();
    assert!(lmq.authenticate(&req("a b", None, None)).await.is_err());
    let id = lmq.authenticate(&req("GID_demo@@@1", None, None)).await.unwrap();
    assert!(id.check_publish("$TopicA/B").is_err());
    // MQTT names: any ClientId; `#` covers `$` topics but never `$SYS`.
    config.naming = crate::config::Naming::Mqtt;
    let mqtt = Authenticator::start(&config, core).await.unwrap();
    let id = mqtt.authenticate(&req("a b", None, None)).await.unwrap();
    assert!(id.check_publish("$TopicA/B").is_ok());
    assert!(id.check_subscribe("$TopicA/#").is_ok());
    assert!(id.check_subscribe("$share/g/$TopicA/#").is_ok());
    assert!(id.check_publish("$SYS/x").is_err());
    assert!(id.check_subscribe("$SYS/#").is_err());
}

/// A `DeviceCredential` CONNECT that fails a check needing no I/O is refused for it before any
/// credential is read: with the core service stopped, the answer is still the cheap one.
#[tokio::test]
async fn device_credential_checks_without_io_come_before_the_credential_read() {
    let (_dir, core, auth) = setup(CONFIG).await;
    core.shutdown().await;
    let wrong_instance = req(CID, Some("DeviceCredential|DAK00|other-instance"), Some(b"pw"));
    assert_eq!(fail(auth.authenticate(&wrong_instance).await).1, "instance_mismatch");
    let no_password = req(CID, Some("DeviceCredential|DAK00|inst-1"), None);
    assert_eq!(fail(auth.authenticate(&no_password).await).1, "missing_password");
    // Past those checks the credential is read, and a stopped core service is said so.
    let read = req(CID, Some("DeviceCredential|DAK00|inst-1"), Some(b"pw"));
    assert_eq!(fail(auth.authenticate(&read).await).1, "server_unavailable");
}
