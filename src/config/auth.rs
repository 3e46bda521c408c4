//! The `auth:` section of `gateway.yaml` as data: access keys, token settings, anonymous access.
//!
//! Plain serde data like the rest of `config`. Secrets are held in [`Secret`], whose `Debug`
//! and `Serialize` never show the value, so `check-config` and logs cannot leak them.
//! Applying secrets from the environment and checking the section ([`AuthConfig::resolve`])
//! is `auth::config`'s part: it builds the ACLs of `auth`, and `config` imports nothing from
//! `auth`. This module must not start anything.
//!
//! # Secrets from the environment
//!
//! - `LMQ_ACCESS_KEY_<ID>_SECRET` overrides the secret of access key `<ID>`, where `<ID>` is
//!   the key id in upper case with every character other than `A-Z` / `0-9` replaced by `_`
//!   (`demo-key` → `LMQ_ACCESS_KEY_DEMO_KEY_SECRET`). The file may then leave `secret` empty.
//! - `LMQ_TOKEN_SIGNING_SECRET` overrides `token.signing_secret`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Shortest token lifetime issued.
pub const MIN_TOKEN_TTL_SECS: u64 = 60;
/// Longest token lifetime issued (30 days).
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

/// A secret string: compared and used, never shown (`Debug` and `Serialize` redact it).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for computing MACs. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "Secret(<empty>)" } else { "Secret(<redacted>)" })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// Authentication and authorisation (SPEC §4).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients that send no user name; they get `anonymous_acl`.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// The top-level `naming` (copied here when the configuration is loaded): with `mqtt`,
    /// any ClientId is accepted and ACL grants starting with a wildcard cover `$` topics.
    #[serde(skip)]
    pub naming: super::Naming,
    /// Accept any ClientId made of letters, digits, `-`, `_` and `@`, instead of requiring
    /// LMQ's `<GroupId>@@@<DeviceId>` form.
    #[serde(default)]
    pub allow_plain_client_ids: bool,
    /// LMQ instance id; when set, the `<InstanceId>` part of user names must equal it.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Access keys for signature and token mode, each with its permissions.
    #[serde(default)]
    pub access_keys: Vec<AccessKeyConfig>,
    #[serde(default)]
    pub token: TokenConfig,
    /// What anonymous clients may do (only with `allow_anonymous`).
    #[serde(default = "default_anonymous_acl")]
    pub anonymous_acl: AclConfig,
    /// Accept a client that sends no user name but presented a client certificate the TLS
    /// listener verified (mTLS, `tls.client_ca`), when its ClientId equals the certificate's
    /// CN; it gets `certificate_acl`.
    #[serde(default)]
    pub tls_client_cn_identity: bool,
    /// What clients authenticated by their certificate may do.
    #[serde(default = "default_anonymous_acl")]
    pub certificate_acl: AclConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            naming: super::Naming::Lmq,
            allow_plain_client_ids: false,
            instance_id: None,
            access_keys: Vec::new(),
            token: TokenConfig::default(),
            anonymous_acl: default_anonymous_acl(),
            tls_client_cn_identity: false,
            certificate_acl: default_anonymous_acl(),
        }
    }
}

fn default_anonymous_acl() -> AclConfig {
    AclConfig { publish: vec!["#".into()], subscribe: vec!["#".into()] }
}

/// One access key (LMQ AccessKey ID / AccessKey Secret pair) and its permissions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKeyConfig {
    /// AccessKey ID, as it appears in user names.
    pub id: String,
    /// AccessKey Secret; `LMQ_ACCESS_KEY_<ID>_SECRET` overrides it (see the module docs).
    #[serde(default)]
    pub secret: Secret,
    /// Topic filters this key may publish to (e.g. `sensors/#`).
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters this key may subscribe to; a requested filter must be covered by one.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Publish / subscribe topic filters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Topic filters that may be published to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters that may be subscribed to (requested filters must be covered by one).
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Token mode settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// HS256 key for every token; when unset, a token is signed with the secret of the access
    /// key it is issued for. `LMQ_TOKEN_SIGNING_SECRET` overrides it.
    #[serde(default)]
    pub signing_secret: Option<Secret>,
    /// Longest token lifetime issued, in seconds (60 … 2592000 = 30 days).
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig { signing_secret: None, max_ttl_secs: default_max_ttl() }
    }
}

fn default_max_ttl() -> u64 {
    MAX_TOKEN_TTL_SECS
}

/// Environment variable holding the secret of access key `id`.
pub fn access_key_secret_env(id: &str) -> String {
    let id: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("LMQ_ACCESS_KEY_{id}_SECRET")
}

/// Environment variable overriding `token.signing_secret`.
pub const TOKEN_SIGNING_SECRET_ENV: &str = "LMQ_TOKEN_SIGNING_SECRET";
