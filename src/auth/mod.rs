//! Authentication and authorisation (SPEC §4): who a client is at CONNECT, and what it may
//! publish and subscribe to afterwards.
//!
//! Modes, chosen by the CONNECT user name `<Mode>|<AccessKeyId>|<InstanceId>`:
//! `Signature` ([`signature`]), `Token` ([`token`]), `DeviceCredential` ([`credential`]);
//! no user name = anonymous (only with `auth.allow_anonymous`). Access keys come from
//! `gateway.yaml` ([`config`]); device credentials and revoked token ids live in the core
//! service (`StateStore::Credentials`, `StateStore::RevokedTokens`) so that every gateway
//! sees every registration and revocation. Device credentials grow with the fleet, so none
//! is held in memory: a `DeviceCredential` CONNECT reads its own from the core service's
//! local view (`CoreService::peek_state`; an unknown one once more with `get_state`, which
//! sees a credential registered on another gateway just before), and removals arrive through
//! `CoreService::follow_state`. Revoked token ids are few and each lives only until its
//! token expires: the [`Authenticator`] keeps them in memory, fed by
//! `CoreService::watch_state`.
//!
//! This module decides and explains; it does not write packets, log per client or count.
//! The connection code turns its answers into MQTT packets and metrics.
//!
//! # How the connection code uses it
//!
//! ```text
//! // once, in the composition root
//! let auth = Arc::new(Authenticator::start(&config.auth, core.clone()).await?);
//!
//! // CONNECT (after limits.check_client_id)
//! let req = AuthRequest { client_id, username, password, tls_client_cn: None };
//! match auth.authenticate(&req).await {
//!     Ok(identity) => { /* keep it in the connection */ }
//!     Err(f) => // CONNACK: MQTT 5 f.reason_code() (0x85/0x86/0x87/0x88),
//!               // MQTT 3.1.1 f.v3_return_code() (2/4/5/3);
//!               // metric labels f.mode.as_str(), f.reason
//! }
//!
//! // PUBLISH (not `$SYS/...`)                    // SUBSCRIBE, per filter
//! identity.check_publish(topic)                   identity.check_subscribe(filter)
//!   Err(d) => MQTT 5 PUBACK/PUBREC d.reason_code (0x87); QoS 0 / 3.1.1: drop or close;
//!             SUBACK 0x87 (v5) / 0x80 (3.1.1). In token mode d.token_invalid is Some
//!             (code 4 resource / 5 permission mismatch): LMQ then publishes
//!             d.token_invalid.notice_json() on `$SYS/tokenInvalidNotice` and disconnects.
//!
//! // PUBLISH to `$SYS/uploadToken`
//! match auth.upload_token(&identity, payload) {
//!     Ok(new_identity) => { identity = new_identity; /* reschedule expiry timers */ }
//!     Err(t) => // publish t.notice_json() on `$SYS/tokenInvalidNotice`, disconnect (0x87)
//! }
//!
//! // token expiry (token mode): for g in &identity.tokens
//! //   at g.expire_ms - 5 min: publish g.expire_notice_json() on `$SYS/tokenExpireNotice`
//! //   at identity.next_expiry(): if let Some(d) = identity.expired(now_ms()) → notice + disconnect
//!
//! // revocations: one receiver per connection, polled in the select loop
//! let mut rx = auth.revocations();
//! Ok(rev) = rx.recv() => if let Some(d) = identity.affected_by(&rev) { notice (if any) + disconnect }
//! Err(Lagged(_))      => if let Some(d) = auth.recheck(&identity) { same }
//! ```
//!
//! `$SYS/...` topics are the gateway's own; they are not subject to the ACL.
//! The TLS client certificate CN in [`AuthRequest`] is accepted but not used yet.

pub mod acl;
pub mod client_id;
pub mod config;
pub mod credential;
pub mod signature;
pub mod token;

use bytes::Bytes;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

use crate::backend::{BackendError, SharedCoreService, StateStore, StateUpdate};
use crate::protocol::ReasonCode;

use self::acl::{covers, Acl};
use self::config::{AccessKey, AuthConfig, AuthConfigError, ResolvedAuth, Secret};
use self::credential::{DeviceCredential, NewCredential, StoredCredential};
use self::token::{IssueError, IssuedToken, TokenGrant, TokenInvalid, TokenInvalidCode, TokenType, UploadToken};

// Defined in `labels`, so that `metrics` can label its counters without importing `auth`.
pub use crate::labels::{AuthMode, FAILURE_LABELS};

/// What a CONNECT presents.
#[derive(Clone, Copy)]
pub struct AuthRequest<'a> {
    /// The final ClientId (after any server assignment).
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// Common name of a verified TLS client certificate (not used yet).
    pub tls_client_cn: Option<&'a str>,
}

impl fmt::Debug for AuthRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.map(|_| "<redacted>"))
            .field("tls_client_cn", &self.tls_client_cn)
            .finish()
    }
}

/// A refused CONNECT: what to answer and how to count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed ({}: {reason})", mode.as_str())]
pub struct AuthFailure {
    /// Mode the user name asked for (`mode` label).
    pub mode: AuthMode,
    /// Low-cardinality cause (`reason` label): `client_id_invalid`, `missing_username`,
    /// `bad_username`, `instance_mismatch`, `unknown_access_key`, `missing_password`,
    /// `bad_signature`, `client_id_mismatch`, `forged_token`, `expired_token`, `revoked_token`,
    /// `permission_mismatch`, `server_unavailable`.
    pub reason: &'static str,
    code: ReasonCode,
    /// For token failures: the token verdict (for logs; no notice can be sent before CONNACK).
    pub token_invalid: Option<TokenInvalid>,
}

impl AuthFailure {
    fn new(mode: AuthMode, reason: &'static str, code: ReasonCode) -> AuthFailure {
        AuthFailure { mode, reason, code, token_invalid: None }
    }

    /// MQTT 5 CONNACK reason code: 0x85, 0x86, 0x87 or 0x88.
    pub fn reason_code(&self) -> ReasonCode {
        self.code
    }

    /// MQTT 3.1.1 CONNACK return code: 2, 4, 5 or 3.
    pub fn v3_return_code(&self) -> u8 {
        self.code.to_v3_connack()
    }
}

/// A refused action of a connected client, or a reason to disconnect it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// MQTT 5 reason code (0x87 not authorized).
    pub reason_code: ReasonCode,
    /// Token mode: the `$SYS/tokenInvalidNotice` to send before disconnecting.
    pub token_invalid: Option<TokenInvalid>,
    /// Metrics label.
    pub reason: &'static str,
}

impl Denied {
    fn plain() -> Denied {
        Denied { reason_code: ReasonCode::NOT_AUTHORIZED, token_invalid: None, reason: "not_authorized" }
    }

    fn token(code: TokenInvalidCode, token_type: Option<TokenType>) -> Denied {
        Denied {
            reason_code: ReasonCode::NOT_AUTHORIZED,
            token_invalid: Some(TokenInvalid::new(code, token_type)),
            reason: code.as_str(),
        }
    }
}

/// Something was revoked somewhere (any gateway): connections holding it must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Token id (`jti`).
    Token { jti: String },
    /// DeviceAccessKeyId of a removed device credential.
    Credential { access_key_id: String },
}

/// Who a connected client is and what it may do. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub mode: AuthMode,
    /// AccessKeyId (signature / token) or DeviceAccessKeyId (device credential).
    pub access_key_id: Option<String>,
    /// What the client may publish / subscribe to.
    pub acl: Acl,
    /// Token mode: one grant per `<type>|<token>` pair (1 … 3), else empty.
    pub tokens: Vec<TokenGrant>,
    /// Token mode: the access key's own permissions, which bound the token's.
    key_acl: Option<Acl>,
    /// `naming: mqtt`: a grant starting with a wildcard also covers `$` topics (other than
    /// `$SYS`, which no client reaches): an ACL says what a client may do, it is not a
    /// subscription, so `#` grants everything a standard broker's open access does.
    pub dollar_wildcards: bool,
}

impl Identity {
    fn new(mode: AuthMode, access_key_id: Option<String>, acl: Acl) -> Identity {
        Identity { mode, access_key_id, acl, tokens: Vec::new(), key_acl: None, dollar_wildcards: false }
    }

    fn with_tokens(access_key_id: &str, key_acl: Acl, tokens: Vec<TokenGrant>) -> Identity {
        let acl = tokens.iter().fold(Acl::default(), |acc, g| acc.union(&g.acl()));
        Identity {
            mode: AuthMode::Token,
            access_key_id: Some(access_key_id.to_owned()),
            acl,
            tokens,
            key_acl: Some(key_acl),
            dollar_wildcards: false,
        }
    }

    /// Who owns what this identity creates (persistent sessions): the mode and the key,
    /// device credential or certificate name it authenticated with. No secret.
    pub fn owner(&self) -> String {
        format!("{}:{}", self.mode.as_str(), self.access_key_id.as_deref().unwrap_or(""))
    }

    /// May the client publish to `topic`? (Not for `$SYS/...` gateway topics.)
    pub fn check_publish(&self, topic: &str) -> Result<(), Denied> {
        let allowed = |t: &str| self.acl.can_publish(t) && self.key_acl.as_ref().is_none_or(|k| k.can_publish(t));
        if allowed(topic) || self.undollared(topic).is_some_and(|t| allowed(&t)) {
            return Ok(());
        }
        Err(self.token_denial(TokenType::W, |g| g.acl().can_subscribe(topic)))
    }

    /// May the client subscribe to `filter` (plain or `$share/<group>/...`)?
    pub fn check_subscribe(&self, filter: &str) -> Result<(), Denied> {
        let allowed = |f: &str| self.acl.can_subscribe(f) && self.key_acl.as_ref().is_none_or(|k| k.can_subscribe(f));
        if allowed(filter) || self.undollared(filter).is_some_and(|f| allowed(&f)) {
            return Ok(());
        }
        let inner = crate::router::topic::parse_filter(filter).map(|p| p.filter).unwrap_or(filter);
        Err(self.token_denial(TokenType::R, |g| g.resources.iter().any(|r| covers(r, inner))))
    }

    /// With `dollar_wildcards`, a `$` topic or filter (`$share/<group>/` kept) with its first
    /// level replaced by one that only wildcards match, for checking it against the grants.
    fn undollared(&self, topic: &str) -> Option<String> {
        if !self.dollar_wildcards {
            return None;
        }
        let (prefix, rest) = match topic.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
            Some((group, filter)) => (format!("$share/{group}/"), filter),
            None => (String::new(), topic),
        };
        if !rest.starts_with('$') || rest == "$SYS" || rest.starts_with("$SYS/") {
            return None;
        }
        let tail = rest.find('/').map_or("", |i| &rest[i..]);
        Some(format!("{prefix}\u{1}{tail}"))
    }

    /// Token mode: 5 when a token covers the resource for the other action, else 4.
    fn token_denial(&self, wanted: TokenType, other_action_covers: impl Fn(&TokenGrant) -> bool) -> Denied {
        if self.mode != AuthMode::Token {
            return Denied::plain();
        }
        match self.tokens.iter().find(|g| !g.token_type.includes(wanted) && other_action_covers(g)) {
            Some(g) => Denied::token(TokenInvalidCode::PermissionMismatch, Some(g.token_type)),
            None => Denied::token(TokenInvalidCode::ResourceMismatch, Some(wanted)),
        }
    }

    /// The grant that expires first (token mode).
    pub fn next_expiry(&self) -> Option<&TokenGrant> {
        self.tokens.iter().min_by_key(|g| g.expire_ms)
    }

    /// Token mode: a grant has expired at `now_ms` → notice code 2 and disconnect.
    pub fn expired(&self, now_ms: i64) -> Option<Denied> {
        self.tokens
            .iter()
            .find(|g| g.expire_ms <= now_ms)
            .map(|g| Denied::token(TokenInvalidCode::Expired, Some(g.token_type)))
    }

    /// Does `rev` end this connection? Token: notice code 3; credential: plain 0x87.
    pub fn affected_by(&self, rev: &Revocation) -> Option<Denied> {
        match rev {
            Revocation::Token { jti } => self
                .tokens
                .iter()
                .find(|g| g.jti == *jti)
                .map(|g| Denied::token(TokenInvalidCode::Revoked, Some(g.token_type))),
            Revocation::Credential { access_key_id } => (self.mode == AuthMode::DeviceCredential
                && self.access_key_id.as_deref() == Some(access_key_id.as_str()))
            .then(|| Denied { reason: "revoked_credential", ..Denied::plain() }),
        }
    }
}

/// Errors of the management calls (register / revoke), not of client authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Config(#[from] AuthConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Invalid(String),
}

/// Access keys from the configuration, with their secrets: signing and token issuing without
/// a core service (CLI, admin API).
#[derive(Debug, Clone)]
pub struct KeyRing {
    config: ResolvedAuth,
}

impl KeyRing {
    /// Resolve secrets from the environment and validate.
    pub fn from_config(config: &AuthConfig) -> Result<KeyRing, AuthConfigError> {
        Ok(KeyRing { config: config.resolve()? })
    }

    pub fn from_resolved(config: ResolvedAuth) -> KeyRing {
        KeyRing { config }
    }

    pub fn access_key(&self, id: &str) -> Option<&AccessKey> {
        self.config.access_keys.iter().find(|k| k.id == id)
    }

    /// The first configured access key.
    pub fn first_access_key(&self) -> Option<&AccessKey> {
        self.config.access_keys.first()
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.config.instance_id.as_deref()
    }

    /// Key that signs (and verifies) tokens of access key `id`.
    fn token_key<'a>(&'a self, key: &'a AccessKey) -> &'a Secret {
        self.config.signing_secret.as_ref().unwrap_or(&key.secret)
    }

    /// Issue a token for access key `access_key_id`; every resource must be within the key's
    /// own permissions for each action (subscribe for R, publish for W).
    pub fn issue_token(
        &self,
        access_key_id: &str,
        resources: &[String],
        actions: TokenType,
        ttl_secs: u64,
    ) -> Result<IssuedToken, IssueError> {
        let key = self.access_key(access_key_id).ok_or_else(|| IssueError::UnknownAccessKey(access_key_id.into()))?;
        for r in resources {
            let check = |granted: &[String], action| {
                if granted.iter().any(|g| covers(g, r)) {
                    Ok(())
                } else {
                    Err(IssueError::NotPermitted { key: key.id.clone(), action, filter: r.clone() })
                }
            };
            if actions.read() {
                check(key.acl.subscribe_filters(), "subscribe")?;
            }
            if actions.write() {
                check(key.acl.publish_filters(), "publish")?;
            }
        }
        let now_secs = u64::try_from(now_ms() / 1000).unwrap_or(0);
        token::issue_token(
            self.token_key(key),
            access_key_id,
            resources,
            actions,
            ttl_secs,
            self.config.max_ttl_secs,
            now_secs,
        )
    }
}

pub use crate::now_ms;

/// How often expired entries are dropped from the revoked-token store.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const WATCH_CAPACITY: usize = 256;
/// Longest a CONNECT waits for its device credential to be read; then it is refused as
/// server unavailable and the client retries.
const CREDENTIAL_READ_TIMEOUT: Duration = Duration::from_secs(10);
const REVOCATION_CAPACITY: usize = 1024;

/// Value stored per revoked token id.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RevokedEntry {
    /// The token's own expiry, ms since the epoch: the entry may go after it.
    exp_ms: i64,
}

impl RevokedEntry {
    pub(crate) fn encode(exp_ms: i64) -> Bytes {
        Bytes::from(serde_json::to_vec(&RevokedEntry { exp_ms }).unwrap_or_default())
    }

    /// Until when a stored entry keeps its token revoked. Fail closed: an unreadable entry
    /// keeps it revoked for good.
    pub(crate) fn revoked_until(value: &[u8]) -> i64 {
        serde_json::from_slice::<RevokedEntry>(value).map_or(i64::MAX, |e| e.exp_ms)
    }
}

struct Inner {
    keys: KeyRing,
    core: SharedCoreService,
    revoked: RwLock<HashMap<String, i64>>,
    revocations: broadcast::Sender<Revocation>,
    /// False once the core service stopped feeding the view.
    watching: AtomicBool,
}

/// Checks CONNECT credentials and manages device credentials and revocations. One per
/// gateway process; share it with `Arc`.
pub struct Authenticator {
    inner: Arc<Inner>,
    watcher: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("access_keys", &self.inner.keys.config.access_keys.len())
            .field("revoked_tokens", &self.inner.revoked.read().len())
            .finish()
    }
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Authenticator {
    /// Validate the `auth:` section and load the credential and revocation views from the
    /// core service (then kept up to date in the background). Needs a tokio runtime.
    pub async fn start(config: &AuthConfig, core: SharedCoreService) -> Result<Authenticator, AuthError> {
        let keys = KeyRing::from_config(config)?;
        let (cred_tx, cred_rx) = mpsc::channel(WATCH_CAPACITY);
        let (rev_tx, rev_rx) = mpsc::channel(WATCH_CAPACITY);
        core.follow_state(StateStore::Credentials, cred_tx).await?;
        let revoked = core.watch_state(StateStore::RevokedTokens, rev_tx).await?;
        let (revocations, _) = broadcast::channel(REVOCATION_CAPACITY);
        let inner = Arc::new(Inner {
            keys,
            core,
            revoked: RwLock::new(HashMap::new()),
            revocations,
            watching: AtomicBool::new(true),
        });
        for (key, value) in revoked {
            inner.apply(StateUpdate { store: StateStore::RevokedTokens, key, value: Some(value) }, false);
        }
        let watcher = tokio::spawn(watch(Arc::downgrade(&inner), cred_rx, rev_rx));
        Ok(Authenticator { inner, watcher })
    }

    /// The configured access keys (signing, token issuing).
    pub fn keys(&self) -> &KeyRing {
        &self.inner.keys
    }

    /// Check a CONNECT. Answers from configuration and the in-memory views; a
    /// `DeviceCredential` CONNECT reads its credential first ([`Authenticator::credential`]).
    pub async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Identity, AuthFailure> {
        let dollar_wildcards = self.inner.keys.config.naming == crate::config::Naming::Mqtt;
        let now = now_ms();
        // Everything that needs no I/O is checked first: a `DeviceCredential` CONNECT reads its
        // credential only once its ClientId, instance and password have passed.
        let decided = match self.authenticate_at(req, now, None) {
            Err(f) if f.mode == AuthMode::DeviceCredential && f.reason == "unknown_access_key" => {
                let unavailable =
                    AuthFailure::new(AuthMode::DeviceCredential, "server_unavailable", ReasonCode::SERVER_UNAVAILABLE);
                // Fail closed: without the removals stream a revoked credential could still log in.
                if !self.inner.watching.load(Ordering::Acquire) {
                    return Err(unavailable);
                }
                let ak = req.username.and_then(|u| u.split('|').nth(1)).unwrap_or_default();
                match tokio::time::timeout(CREDENTIAL_READ_TIMEOUT, self.credential(ak)).await {
                    Ok(Ok(credential)) => self.authenticate_at(req, now, credential.as_ref()),
                    Ok(Err(_)) | Err(_) => Err(unavailable),
                }
            }
            decided => decided,
        };
        decided.map(|mut id| {
            id.dollar_wildcards = dollar_wildcards;
            id
        })
    }

    /// Device credential `access_key_id`: read from this gateway's view of the core service,
    /// and when it is not there, once more after the view has caught up with every gateway's
    /// writes (a credential registered elsewhere just before). An entry that cannot be read
    /// authenticates nobody.
    async fn credential(&self, access_key_id: &str) -> Result<Option<DeviceCredential>, BackendError> {
        if access_key_id.is_empty() || access_key_id.len() > credential::MAX_ACCESS_KEY_ID {
            return Ok(None);
        }
        let core = &self.inner.core;
        let value = match core.peek_state(StateStore::Credentials, access_key_id).await? {
            Some(v) => Some(v),
            None => core.get_state(StateStore::Credentials, access_key_id).await?,
        };
        Ok(value.and_then(|v| {
            let cred = StoredCredential::decode(&v);
            if cred.is_none() {
                tracing::warn!(access_key_id, "unreadable device credential ignored");
            }
            cred
        }))
    }

    /// `credential`: the stored device credential of the user name's access key, read by
    /// [`Authenticator::authenticate`] (`None`: none, or not a `DeviceCredential` CONNECT).
    fn authenticate_at(
        &self,
        req: &AuthRequest<'_>,
        now_ms: i64,
        credential: Option<&DeviceCredential>,
    ) -> Result<Identity, AuthFailure> {
        let cfg = &self.inner.keys.config;
        let bad = ReasonCode::BAD_USER_NAME_OR_PASSWORD;
        let parts = req.username.map(|u| {
            let mut it = u.split('|');
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some(mode), Some(ak), Some(instance), None) if !ak.is_empty() => {
                    let mode = match mode {
                        "Signature" => AuthMode::Signature,
                        "Token" => AuthMode::Token,
                        "DeviceCredential" => AuthMode::DeviceCredential,
                        _ => AuthMode::Unknown,
                    };
                    (mode, ak, instance)
                }
                _ => (AuthMode::Unknown, "", ""),
            }
        });
        let mode = parts.map_or(AuthMode::Anonymous, |(m, _, _)| m);
        // `naming: mqtt`: any ClientId MQTT allows (the length limit is checked on CONNECT).
        let lmq_names = cfg.naming == crate::config::Naming::Lmq;
        if lmq_names && client_id::validate(req.client_id, cfg.allow_plain_client_ids).is_err() {
            return Err(AuthFailure::new(mode, "client_id_invalid", ReasonCode::CLIENT_IDENTIFIER_NOT_VALID));
        }
        let Some((mode, ak, instance)) = parts else {
            if let Some(cn) = req.tls_client_cn.filter(|_| cfg.tls_client_cn_identity) {
                return if cn == req.client_id {
                    Ok(Identity::new(AuthMode::Certificate, Some(cn.to_owned()), cfg.certificate_acl.clone()))
                } else {
                    Err(AuthFailure::new(AuthMode::Certificate, "client_id_not_cn", ReasonCode::NOT_AUTHORIZED))
                };
            }
            return if cfg.allow_anonymous {
                Ok(Identity::new(AuthMode::Anonymous, None, cfg.anonymous_acl.clone()))
            } else {
                Err(AuthFailure::new(AuthMode::Anonymous, "missing_username", ReasonCode::NOT_AUTHORIZED))
            };
        };
        if mode == AuthMode::Unknown {
            return Err(AuthFailure::new(mode, "bad_username", bad));
        }
        if cfg.instance_id.as_deref().is_some_and(|want| want != instance) {
            return Err(AuthFailure::new(mode, "instance_mismatch", bad));
        }
        let Some(password) = req.password else {
            return Err(AuthFailure::new(mode, "missing_password", bad));
        };
        match mode {
            AuthMode::Signature => {
                let key = self.inner.keys.access_key(ak).ok_or(AuthFailure::new(mode, "unknown_access_key", bad))?;
                if !signature::verify(key.secret.expose(), req.client_id, password) {
                    return Err(AuthFailure::new(mode, "bad_signature", bad));
                }
                Ok(Identity::new(mode, Some(key.id.clone()), key.acl.clone()))
            }
            AuthMode::Token => {
                let key = self.inner.keys.access_key(ak).ok_or(AuthFailure::new(mode, "unknown_access_key", bad))?;
                let fail = |t: TokenInvalid| {
                    let code =
                        if t.code == TokenInvalidCode::PermissionMismatch { ReasonCode::NOT_AUTHORIZED } else { bad };
                    AuthFailure { token_invalid: Some(t), ..AuthFailure::new(mode, t.code.as_str(), code) }
                };
                let pairs = token::parse_password(password).map_err(fail)?;
                let signing_key = self.inner.keys.token_key(key);
                let revoked = self.inner.revoked.read();
                // Any invalid token makes the whole password invalid.
                let grants = pairs
                    .into_iter()
                    .map(|(t, tok)| token::validate(signing_key, tok, t, &key.id, now_ms, |j| revoked.contains_key(j)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(fail)?;
                Ok(Identity::with_tokens(&key.id, key.acl.clone(), grants))
            }
            AuthMode::DeviceCredential => {
                let cred = credential.ok_or(AuthFailure::new(mode, "unknown_access_key", bad))?;
                if cred.client_id != req.client_id {
                    return Err(AuthFailure::new(mode, "client_id_mismatch", ReasonCode::NOT_AUTHORIZED));
                }
                if !signature::verify(cred.secret.expose(), req.client_id, password) {
                    return Err(AuthFailure::new(mode, "bad_signature", bad));
                }
                Ok(Identity::new(mode, Some(ak.to_owned()), cred.acl.clone()))
            }
            AuthMode::Anonymous | AuthMode::Certificate | AuthMode::Unknown => {
                Err(AuthFailure::new(mode, "bad_username", bad))
            }
        }
    }

    /// `$SYS/uploadToken`: validate `{"token": "...", "type": "R"|"W"|"RW"}` for the access key
    /// of a token-mode `identity` and return the identity with that token in place of the
    /// grants it covers (same type, or all for `RW`). On error the old identity stays
    /// unchanged and the client is to be told (`notice_json`) and disconnected.
    pub fn upload_token(&self, identity: &Identity, json: &[u8]) -> Result<Identity, TokenInvalid> {
        self.upload_token_at(identity, json, now_ms())
    }

    fn upload_token_at(&self, identity: &Identity, json: &[u8], now_ms: i64) -> Result<Identity, TokenInvalid> {
        let forged = TokenInvalid::new(TokenInvalidCode::Forged, None);
        let upload: UploadToken = serde_json::from_slice(json).map_err(|_| forged)?;
        let invalid = TokenInvalid::new(TokenInvalidCode::Forged, Some(upload.token_type));
        if identity.mode != AuthMode::Token {
            return Err(invalid);
        }
        let ak = identity.access_key_id.as_deref().ok_or(invalid)?;
        let key = self.inner.keys.access_key(ak).ok_or(invalid)?;
        let grant = {
            let revoked = self.inner.revoked.read();
            token::validate(self.inner.keys.token_key(key), &upload.token, upload.token_type, ak, now_ms, |j| {
                revoked.contains_key(j)
            })?
        };
        let mut tokens: Vec<TokenGrant> =
            identity.tokens.iter().filter(|g| !upload.token_type.includes(g.token_type)).cloned().collect();
        tokens.push(grant);
        let mut id = Identity::with_tokens(ak, key.acl.clone(), tokens);
        id.dollar_wildcards = identity.dollar_wildcards;
        Ok(id)
    }

    /// Revocations from every gateway, as they arrive (see the module docs).
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.inner.revocations.subscribe()
    }

    /// Check `identity` against the current views (after a lagged revocation receiver).
    pub async fn recheck(&self, identity: &Identity) -> Option<Denied> {
        if identity.mode == AuthMode::DeviceCredential {
            let id = identity.access_key_id.as_deref().unwrap_or_default();
            let value = self.inner.core.peek_state(StateStore::Credentials, id).await;
            // A view that cannot be read keeps the connection: the revocation stream goes on.
            if matches!(value, Ok(None)) {
                return Some(Denied { reason: "revoked_credential", ..Denied::plain() });
            }
        }
        let revoked = self.inner.revoked.read();
        identity
            .tokens
            .iter()
            .find(|g| revoked.contains_key(&g.jti))
            .map(|g| Denied::token(TokenInvalidCode::Revoked, Some(g.token_type)))
    }

    /// Register a device credential bound to `client_id` with permissions `acl`; returns the
    /// new DeviceAccessKeyId and secret (shown once). Durable in the core service when `Ok`.
    pub async fn register_credential(&self, client_id: &str, acl: Acl) -> Result<NewCredential, AuthError> {
        client_id::validate(client_id, self.inner.keys.config.allow_plain_client_ids)
            .map_err(|e| AuthError::Invalid(format!("ClientId `{client_id}`: {e}")))?;
        let (access_key_id, secret) = credential::generate();
        let stored = StoredCredential {
            v: credential::FORMAT_VERSION,
            secret: secret.expose().to_owned(),
            client_id: client_id.to_owned(),
            publish: acl.publish_filters().to_vec(),
            subscribe: acl.subscribe_filters().to_vec(),
            created_ms: now_ms(),
        };
        let value = Bytes::from(stored.encode());
        self.inner.core.put_state(StateStore::Credentials, &access_key_id, Some(value)).await?;
        Ok(NewCredential { access_key_id, secret, client_id: client_id.to_owned() })
    }

    /// Remove a device credential; connections using it are told through `revocations()`.
    pub async fn revoke_credential(&self, access_key_id: &str) -> Result<(), AuthError> {
        self.inner.core.put_state(StateStore::Credentials, access_key_id, None).await?;
        Ok(())
    }

    /// Revoke token `jti` until its expiry `exp_ms` (after which it is invalid anyway and the
    /// entry is dropped). Connections holding it are told through `revocations()`.
    pub async fn revoke_token(&self, jti: &str, exp_ms: i64) -> Result<(), AuthError> {
        if jti.is_empty() || jti.len() > 128 {
            return Err(AuthError::Invalid("token id must be 1 to 128 characters".into()));
        }
        let value = RevokedEntry::encode(exp_ms);
        self.inner.core.put_state(StateStore::RevokedTokens, jti, Some(value)).await?;
        self.inner.revoked.write().insert(jti.to_owned(), exp_ms);
        Ok(())
    }

    /// Is credential `access_key_id` registered (read-your-writes across gateways)?
    pub async fn has_credential(&self, access_key_id: &str) -> Result<bool, AuthError> {
        Ok(self.credential(access_key_id).await?.is_some())
    }

    /// Is token `jti` revoked in this gateway's view?
    pub fn is_token_revoked(&self, jti: &str) -> bool {
        self.inner.revoked.read().contains_key(jti)
    }
}

impl Inner {
    /// Apply one change of a watched store; `announce` sends removals/revocations to
    /// connected clients.
    fn apply(&self, update: StateUpdate, announce: bool) {
        let StateUpdate { store, key, value } = update;
        match store {
            // Credentials are read when used; only removals concern connected clients.
            StateStore::Credentials => {
                if value.is_none() && announce {
                    let _ = self.revocations.send(Revocation::Credential { access_key_id: key });
                }
            }
            StateStore::RevokedTokens => match value {
                Some(v) => {
                    let exp_ms = RevokedEntry::revoked_until(&v);
                    self.revoked.write().insert(key.clone(), exp_ms);
                    if announce {
                        let _ = self.revocations.send(Revocation::Token { jti: key });
                    }
                }
                None => {
                    self.revoked.write().remove(&key);
                }
            },
            StateStore::Sessions | StateStore::Retained | StateStore::Delay => {}
        }
    }

    /// Drop revoked-token entries whose token has expired, here and in the core service.
    fn prune(&self, now_ms: i64) {
        let expired: Vec<String> = {
            let mut revoked = self.revoked.write();
            let expired = revoked.iter().filter(|(_, exp)| **exp <= now_ms).map(|(k, _)| k.clone()).collect();
            revoked.retain(|_, exp| *exp > now_ms);
            expired
        };
        for jti in expired {
            // Every gateway may do this; deleting twice is harmless.
            let delete = self.core.put_state(StateStore::RevokedTokens, &jti, None);
            tokio::spawn(async move {
                if let Err(e) = delete.await {
                    tracing::debug!(error = %e, "could not drop an expired revoked-token entry");
                }
            });
        }
    }
}

/// Keep the views current until the authenticator is dropped or the core service stops.
async fn watch(inner: Weak<Inner>, mut creds: mpsc::Receiver<StateUpdate>, mut revoked: mpsc::Receiver<StateUpdate>) {
    let mut prune = tokio::time::interval(PRUNE_INTERVAL);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            u = creds.recv() => u.map(Some),
            u = revoked.recv() => u.map(Some),
            _ = prune.tick() => Some(None),
        };
        let Some(inner) = inner.upgrade() else { return };
        match event {
            Some(Some(update)) => inner.apply(update, true),
            Some(None) => inner.prune(now_ms()),
            None => {
                tracing::warn!("core service stopped sending credential updates; device credential logins refused");
                inner.watching.store(false, Ordering::Release);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
