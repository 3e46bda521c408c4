//! Checking the `auth:` section of `gateway.yaml`: [`AuthConfig::resolve`] applies secrets
//! from the environment (the variables are listed in `config::auth`), checks the section and
//! builds the ACLs ([`ResolvedAuth`]).
//!
//! The section itself (plain serde data: [`AuthConfig`], [`Secret`], …) is defined in
//! `config::auth` and re-exported here; this module adds what needs `auth` (the [`Acl`]s).
//! Secrets stay in [`Secret`], whose `Debug` and `Serialize` never show the value, so
//! `check-config` and logs cannot leak them. This module must not start anything.

use super::acl::Acl;
pub use crate::config::auth::{
    access_key_secret_env, AccessKeyConfig, AclConfig, AuthConfig, Secret, TokenConfig, TOKEN_SIGNING_SECRET_ENV,
};
use crate::config::auth::{MAX_TOKEN_TTL_SECS, MIN_TOKEN_TTL_SECS};

/// Why the `auth:` section was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth: {0}")]
pub struct AuthConfigError(pub String);

/// An access key after environment overrides, ready to use.
#[derive(Debug, Clone)]
pub struct AccessKey {
    pub id: String,
    pub secret: Secret,
    pub acl: Acl,
}

/// The section after environment overrides and validation.
#[derive(Debug, Clone)]
pub struct ResolvedAuth {
    pub allow_anonymous: bool,
    pub naming: crate::config::Naming,
    pub allow_plain_client_ids: bool,
    pub instance_id: Option<String>,
    pub access_keys: Vec<AccessKey>,
    pub signing_secret: Option<Secret>,
    pub max_ttl_secs: u64,
    pub anonymous_acl: Acl,
    pub tls_client_cn_identity: bool,
    pub certificate_acl: Acl,
}

impl AuthConfig {
    /// Apply secrets from the process environment and validate.
    pub fn resolve(&self) -> Result<ResolvedAuth, AuthConfigError> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// Validate only (what `check-config` runs).
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        self.resolve().map(|_| ())
    }

    /// [`AuthConfig::resolve`] with an explicit environment (tests).
    pub fn resolve_with(&self, env: impl Fn(&str) -> Option<String>) -> Result<ResolvedAuth, AuthConfigError> {
        let invalid = |m: String| Err(AuthConfigError(m));
        let mut access_keys: Vec<AccessKey> = Vec::with_capacity(self.access_keys.len());
        for key in &self.access_keys {
            if key.id.is_empty() || key.id.contains('|') {
                return invalid(format!("access key id `{}` must be non-empty and contain no `|`", key.id));
            }
            if access_keys.iter().any(|k| k.id == key.id) {
                return invalid(format!("access key `{}` is listed twice", key.id));
            }
            let var = access_key_secret_env(&key.id);
            let secret = match env(&var).filter(|s| !s.is_empty()) {
                Some(s) => Secret::new(s),
                None => key.secret.clone(),
            };
            if secret.is_empty() {
                return invalid(format!("access key `{}` has an empty secret (set `secret` or {var})", key.id));
            }
            let acl = Acl::new(key.publish.clone(), key.subscribe.clone())
                .map_err(|e| AuthConfigError(format!("access key `{}`: {e}", key.id)))?;
            access_keys.push(AccessKey { id: key.id.clone(), secret, acl });
        }
        let signing_secret = match env(TOKEN_SIGNING_SECRET_ENV).filter(|s| !s.is_empty()) {
            Some(s) => Some(Secret::new(s)),
            None => self.token.signing_secret.clone(),
        };
        if signing_secret.as_ref().is_some_and(Secret::is_empty) {
            return invalid(format!("token.signing_secret is empty (remove it or set {TOKEN_SIGNING_SECRET_ENV})"));
        }
        if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&self.token.max_ttl_secs) {
            return invalid(format!(
                "token.max_ttl_secs must be between {MIN_TOKEN_TTL_SECS} and {MAX_TOKEN_TTL_SECS}, not {}",
                self.token.max_ttl_secs
            ));
        }
        if self.instance_id.as_deref().is_some_and(|i| i.is_empty() || i.contains('|')) {
            return invalid("instance_id must be non-empty and contain no `|`".into());
        }
        let anonymous_acl = Acl::new(self.anonymous_acl.publish.clone(), self.anonymous_acl.subscribe.clone())
            .map_err(|e| AuthConfigError(format!("anonymous_acl: {e}")))?;
        let certificate_acl = Acl::new(self.certificate_acl.publish.clone(), self.certificate_acl.subscribe.clone())
            .map_err(|e| AuthConfigError(format!("certificate_acl: {e}")))?;
        Ok(ResolvedAuth {
            allow_anonymous: self.allow_anonymous,
            naming: self.naming,
            allow_plain_client_ids: self.allow_plain_client_ids,
            instance_id: self.instance_id.clone(),
            access_keys,
            signing_secret,
            max_ttl_secs: self.token.max_ttl_secs,
            anonymous_acl,
            tls_client_cn_identity: self.tls_client_cn_identity,
            certificate_acl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> AuthConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const TWO_KEYS: &str = "access_keys:\n  - {id: a-1, secret: s3cr3t-a, publish: ['x/#']}\n  - {id: b, secret: ''}\n";

    #[test]
    fn env_overrides_and_empty_secrets() {
        let cfg = parse(TWO_KEYS);
        let err = cfg.resolve_with(|_| None).unwrap_err().to_string();
        assert!(err.contains("`b` has an empty secret") && err.contains("LMQ_ACCESS_KEY_B_SECRET"), "{err}");
        let resolved = cfg
            .resolve_with(|name| match name {
                "LMQ_ACCESS_KEY_B_SECRET" => Some("from-env".into()),
                "LMQ_ACCESS_KEY_A_1_SECRET" => Some("env-a".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(resolved.access_keys[0].secret.expose(), "env-a");
        assert_eq!(resolved.access_keys[1].secret.expose(), "from-env");
        assert!(resolved.access_keys[0].acl.can_publish("x/y"));
        assert!(!resolved.access_keys[0].acl.can_subscribe("x/y"));
        assert_eq!(access_key_secret_env("demo-key"), "LMQ_ACCESS_KEY_DEMO_KEY_SECRET");
    }

    #[test]
    fn duplicates_bad_filters_and_ttl_refused() {
        let dup = parse("access_keys:\n  - {id: a, secret: x}\n  - {id: a, secret: y}\n");
        assert!(dup.resolve_with(|_| None).unwrap_err().to_string().contains("listed twice"));
        let bad = parse("access_keys:\n  - {id: a, secret: x, subscribe: ['a/#/b']}\n");
        assert!(bad.resolve_with(|_| None).unwrap_err().to_string().contains("access key `a`"));
        let ttl = parse("token: {max_ttl_secs: 10}\n");
        assert!(ttl.resolve_with(|_| None).unwrap_err().to_string().contains("max_ttl_secs"));
        let signing = parse("token: {signing_secret: ''}\n");
        assert!(signing.resolve_with(|_| None).is_err());
        let from_env = signing.resolve_with(|n| (n == TOKEN_SIGNING_SECRET_ENV).then(|| "k".into())).unwrap();
        assert_eq!(from_env.signing_secret.map(|s| s.expose().to_owned()), Some("k".into()));
        assert!(serde_yaml_ng::from_str::<AuthConfig>("allow_anonymus: true\n").is_err());
    }

    #[test]
    fn secrets_are_absent_from_debug_and_serialized_output() {
        let cfg = parse("access_keys:\n  - {id: a, secret: hunter2-secret}\ntoken: {signing_secret: tok-secret-9}\n");
        let resolved = cfg.resolve_with(|_| None).unwrap();
        let outputs = [
            format!("{cfg:?}"),
            format!("{cfg:#?}"),
            format!("{resolved:?}"),
            serde_yaml_ng::to_string(&cfg).unwrap(),
            serde_json::to_string(&cfg).unwrap(),
        ];
        for out in &outputs {
            assert!(!out.contains("hunter2") && !out.contains("tok-secret"), "secret leaked: {out}");
            assert!(out.contains("redacted"), "{out}");
        }
    }
}
