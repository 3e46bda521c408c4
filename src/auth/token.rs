//! Token mode (SPEC §4): issuing and validating LMQ-style tokens.
//!
//! A token is a JWT signed with HS256. Claims: `ak` (the AccessKeyId it was issued for),
//! `resources` (1 … 100 topic filters), `actions` (`R` = subscribe, `W` = publish), `exp` and
//! `iat` (seconds since the epoch) and `jti` (random token id, used for revocation). Lifetime:
//! 60 s … 30 days (and at most `auth.token.max_ttl_secs`), enforced when issuing.
//!
//! The CONNECT password carries one to three `<type>|<token>` pairs (`R|t1|W|t2`, `RW|t3`);
//! the type says what the client uses the token for and must be among the token's actions.
//!
//! # `$SYS/tokenInvalidNotice` codes
//!
//! | code | [`TokenInvalidCode`] | when |
//! |---|---|---|
//! | 1 | `Forged` | not a JWT of ours: unparsable, wrong algorithm, claims missing or malformed, issued for another AccessKeyId, more than 100 resources, a password that is not `<type>\|<token>` pairs |
//! | 2 | `Expired` | `exp` has passed |
//! | 3 | `Revoked` | its `jti` is in the revoked-token store |
//! | 4 | `ResourceMismatch` | a PUBLISH / SUBSCRIBE outside the token's resources |
//! | 5 | `PermissionMismatch` | the type used (`R`/`W`/`RW`) is not among the token's actions, or a PUBLISH / SUBSCRIBE on a granted resource with the other action |
//! | 8 | `BadSignature` | well-formed JWT whose HS256 signature does not verify (tampered payload, wrong key) |
//!
//! 1 vs 8: SPEC §4 lists both; LMQ reports 8 when the signature check fails and 1 when the
//! token could not have come from the issuer at all, which is what we do. Only what a signature
//! check can detect is 8, so a client can tell "key rotated / token tampered" from "garbage".
//!
//! This module is pure (no I/O, no clock: callers pass the time) and never logs tokens.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::fmt;

use super::acl::Acl;
use crate::config::auth::Secret;

/// Shortest and longest token lifetime issued (defined with the `auth:` section they bound).
pub use crate::config::auth::{MAX_TOKEN_TTL_SECS, MIN_TOKEN_TTL_SECS};

/// Most topic filters in one token.
pub const MAX_RESOURCES: usize = 100;
/// Most `<type>|<token>` pairs in one password.
pub const MAX_TOKENS_PER_CONNECTION: usize = 3;

/// What a token is used for: `R` subscribe, `W` publish, `RW` both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenType {
    R,
    W,
    RW,
}

impl TokenType {
    pub fn parse(s: &str) -> Option<TokenType> {
        match s {
            "R" => Some(TokenType::R),
            "W" => Some(TokenType::W),
            "RW" => Some(TokenType::RW),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::R => "R",
            TokenType::W => "W",
            TokenType::RW => "RW",
        }
    }

    pub fn read(self) -> bool {
        matches!(self, TokenType::R | TokenType::RW)
    }

    pub fn write(self) -> bool {
        matches!(self, TokenType::W | TokenType::RW)
    }

    /// Does `self` allow everything `other` does?
    pub fn includes(self, other: TokenType) -> bool {
        (self.read() || !other.read()) && (self.write() || !other.write())
    }

    fn from_actions(actions: &[String]) -> Option<TokenType> {
        let mut read = false;
        let mut write = false;
        for a in actions {
            match a.as_str() {
                "R" => read = true,
                "W" => write = true,
                _ => return None,
            }
        }
        match (read, write) {
            (true, true) => Some(TokenType::RW),
            (true, false) => Some(TokenType::R),
            (false, true) => Some(TokenType::W),
            (false, false) => None,
        }
    }

    fn actions(self) -> Vec<String> {
        let mut out = Vec::new();
        if self.read() {
            out.push("R".to_owned());
        }
        if self.write() {
            out.push("W".to_owned());
        }
        out
    }
}

impl fmt::Display for TokenType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `$SYS/tokenInvalidNotice` codes (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenInvalidCode {
    Forged = 1,
    Expired = 2,
    Revoked = 3,
    ResourceMismatch = 4,
    PermissionMismatch = 5,
    BadSignature = 8,
}

impl TokenInvalidCode {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenInvalidCode::Forged => "forged_token",
            TokenInvalidCode::Expired => "expired_token",
            TokenInvalidCode::Revoked => "revoked_token",
            TokenInvalidCode::ResourceMismatch => "resource_mismatch",
            TokenInvalidCode::PermissionMismatch => "permission_mismatch",
            TokenInvalidCode::BadSignature => "bad_signature",
        }
    }
}

/// A token was refused: what to put in `$SYS/tokenInvalidNotice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("token invalid (code {}, {})", code.code(), code.as_str())]
pub struct TokenInvalid {
    pub code: TokenInvalidCode,
    /// Type of the offending token, when known.
    pub token_type: Option<TokenType>,
}

impl TokenInvalid {
    pub fn new(code: TokenInvalidCode, token_type: Option<TokenType>) -> TokenInvalid {
        TokenInvalid { code, token_type }
    }

    /// Body of `$SYS/tokenInvalidNotice`: `{"code":2,"type":"R"}` (`type` omitted if unknown).
    pub fn notice_json(&self) -> String {
        match self.token_type {
            Some(t) => serde_json::json!({ "code": self.code.code(), "type": t.as_str() }).to_string(),
            None => serde_json::json!({ "code": self.code.code() }).to_string(),
        }
    }
}

/// JWT claims of a token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// AccessKeyId the token was issued for.
    pub ak: String,
    pub resources: Vec<String>,
    pub actions: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("ak", &self.ak)
            .field("resources", &self.resources.len())
            .field("actions", &self.actions)
            .field("exp", &self.exp)
            .field("jti", &self.jti)
            .finish()
    }
}

/// What one valid token grants a connection. Holds no secret (not the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// Token id (`jti`), for revocation.
    pub jti: String,
    /// What the client uses the token for.
    pub token_type: TokenType,
    /// Expiry, milliseconds since the epoch.
    pub expire_ms: i64,
    /// Topic filters (`resources`); subscribe for `R`, publish for `W`.
    pub resources: Vec<String>,
}

impl TokenGrant {
    /// Permissions of this grant alone.
    pub fn acl(&self) -> Acl {
        let pick = |yes: bool| if yes { self.resources.clone() } else { Vec::new() };
        // Resources were validated as filters when the token was checked.
        Acl::new(pick(self.token_type.write()), pick(self.token_type.read())).unwrap_or_default()
    }

    /// Body of `$SYS/tokenExpireNotice`: `{"expireTime":<epoch ms>,"type":"R"}`.
    pub fn expire_notice_json(&self) -> String {
        serde_json::json!({ "expireTime": self.expire_ms, "type": self.token_type.as_str() }).to_string()
    }
}

/// A freshly issued token.
#[derive(Clone)]
pub struct IssuedToken {
    /// The JWT: a bearer credential, treat like a secret.
    pub token: String,
    pub jti: String,
    /// Milliseconds since the epoch.
    pub expire_ms: i64,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"<redacted>")
            .field("jti", &self.jti)
            .field("expire_ms", &self.expire_ms)
            .finish()
    }
}

/// Why a token was not issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("lifetime must be between {min} and {max} seconds, not {requested}")]
    Ttl { requested: u64, min: u64, max: u64 },
    #[error("a token needs 1 to {MAX_RESOURCES} resources, not {0}")]
    ResourceCount(usize),
    #[error("resource {0}")]
    Resource(String),
    #[error("unknown access key `{0}`")]
    UnknownAccessKey(String),
    #[error("access key `{key}` may not {action} `{filter}`")]
    NotPermitted { key: String, action: &'static str, filter: String },
    #[error("cannot sign token: {0}")]
    Sign(String),
}

/// Random token id: 128 bits, hex.
fn new_jti() -> String {
    use rand::RngCore as _;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Issue a token for `access_key_id` signed with `key`. `max_ttl_secs` is
/// `auth.token.max_ttl_secs`; the lifetime must be 60 s … min(max, 30 days).
pub fn issue_token(
    key: &Secret,
    access_key_id: &str,
    resources: &[String],
    actions: TokenType,
    ttl_secs: u64,
    max_ttl_secs: u64,
    now_secs: u64,
) -> Result<IssuedToken, IssueError> {
    let max = max_ttl_secs.min(MAX_TOKEN_TTL_SECS);
    if !(MIN_TOKEN_TTL_SECS..=max).contains(&ttl_secs) {
        return Err(IssueError::Ttl { requested: ttl_secs, min: MIN_TOKEN_TTL_SECS, max });
    }
    if resources.is_empty() || resources.len() > MAX_RESOURCES {
        return Err(IssueError::ResourceCount(resources.len()));
    }
    Acl::new(resources.to_vec(), Vec::new()).map_err(|e| IssueError::Resource(e.to_string()))?;
    let claims = Claims {
        ak: access_key_id.to_owned(),
        resources: resources.to_vec(),
        actions: actions.actions(),
        exp: now_secs.saturating_add(ttl_secs),
        iat: now_secs,
        jti: new_jti(),
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.expose().as_bytes()),
    )
    .map_err(|e| IssueError::Sign(e.to_string()))?;
    let expire_ms = i64::try_from(claims.exp.saturating_mul(1000)).unwrap_or(i64::MAX);
    Ok(IssuedToken { token, jti: claims.jti, expire_ms })
}

/// Decode and check a token's signature and claims, without the expiry or revocation check.
pub fn decode(key: &Secret, token: &str, access_key_id: &str) -> Result<Claims, TokenInvalidCode> {
    let mut validation = Validation::new(Algorithm::HS256);
    // Expiry is checked by the caller against its own clock (testable, one code path).
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp"]);
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key.expose().as_bytes()), &validation)
        .map_err(|e| match e.kind() {
        ErrorKind::InvalidSignature => TokenInvalidCode::BadSignature,
        _ => TokenInvalidCode::Forged,
    })?;
    let claims = data.claims;
    if claims.ak != access_key_id
        || claims.jti.is_empty()
        || claims.resources.is_empty()
        || claims.resources.len() > MAX_RESOURCES
        || TokenType::from_actions(&claims.actions).is_none()
        || Acl::new(claims.resources.clone(), Vec::new()).is_err()
    {
        return Err(TokenInvalidCode::Forged);
    }
    Ok(claims)
}

/// Check one token used as `token_type` at time `now_ms`; `is_revoked(jti)` consults the
/// revoked-token view.
pub fn validate(
    key: &Secret,
    token: &str,
    token_type: TokenType,
    access_key_id: &str,
    now_ms: i64,
    is_revoked: impl Fn(&str) -> bool,
) -> Result<TokenGrant, TokenInvalid> {
    let invalid = |code| TokenInvalid::new(code, Some(token_type));
    let claims = decode(key, token, access_key_id).map_err(invalid)?;
    let expire_ms = i64::try_from(claims.exp.saturating_mul(1000)).unwrap_or(i64::MAX);
    if expire_ms <= now_ms {
        return Err(invalid(TokenInvalidCode::Expired));
    }
    if is_revoked(&claims.jti) {
        return Err(invalid(TokenInvalidCode::Revoked));
    }
    let granted = TokenType::from_actions(&claims.actions).ok_or(invalid(TokenInvalidCode::Forged))?;
    if !granted.includes(token_type) {
        return Err(invalid(TokenInvalidCode::PermissionMismatch));
    }
    Ok(TokenGrant { jti: claims.jti, token_type, expire_ms, resources: claims.resources })
}

/// Split a CONNECT password into `(type, token)` pairs: one to three, types not repeated.
pub fn parse_password(password: &[u8]) -> Result<Vec<(TokenType, &str)>, TokenInvalid> {
    let forged = TokenInvalid::new(TokenInvalidCode::Forged, None);
    let text = std::str::from_utf8(password).map_err(|_| forged)?;
    let parts: Vec<&str> = text.split('|').collect();
    if !parts.len().is_multiple_of(2) || parts.is_empty() || parts.len() > 2 * MAX_TOKENS_PER_CONNECTION {
        return Err(forged);
    }
    let mut out: Vec<(TokenType, &str)> = Vec::with_capacity(parts.len() / 2);
    for pair in parts.chunks_exact(2) {
        let (t, token) = (pair[0], pair[1]);
        let t = TokenType::parse(t).ok_or(forged)?;
        if token.is_empty() || out.iter().any(|(seen, _)| *seen == t) {
            return Err(TokenInvalid::new(TokenInvalidCode::Forged, Some(t)));
        }
        out.push((t, token));
    }
    Ok(out)
}

/// Body of a `$SYS/uploadToken` PUBLISH.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadToken {
    pub token: String,
    #[serde(rename = "type")]
    pub token_type: TokenType,
}

impl fmt::Debug for UploadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadToken").field("token", &"<redacted>").field("type", &self.token_type).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    const NOW: u64 = 1_700_000_000;
    const NOW_MS: i64 = NOW as i64 * 1000;

    fn key() -> Secret {
        Secret::new("signing-key")
    }

    fn res(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn issue(actions: TokenType, ttl: u64) -> IssuedToken {
        issue_token(&key(), "ak1", &res(&["a/#", "b/+"]), actions, ttl, MAX_TOKEN_TTL_SECS, NOW).unwrap()
    }

    fn check(token: &str, t: TokenType) -> Result<TokenGrant, TokenInvalid> {
        validate(&key(), token, t, "ak1", NOW_MS, |_| false)
    }

    #[test]
    fn valid_r_w_rw_tokens_grant_their_actions() {
        let r = check(&issue(TokenType::R, 3600).token, TokenType::R).unwrap();
        assert_eq!(r.expire_ms, (NOW + 3600) as i64 * 1000);
        assert!(r.acl().can_subscribe("a/x/y") && !r.acl().can_publish("a/x"));
        let w = check(&issue(TokenType::W, 3600).token, TokenType::W).unwrap();
        assert!(w.acl().can_publish("b/x") && !w.acl().can_subscribe("b/x") && !w.acl().can_publish("b/x/y"));
        let rw = issue(TokenType::RW, 3600);
        let g = check(&rw.token, TokenType::RW).unwrap();
        assert_eq!(g.jti, rw.jti);
        assert!(g.acl().can_publish("a/1") && g.acl().can_subscribe("a/#"));
        // An RW token may be used as R only; an R token not as W.
        assert!(check(&rw.token, TokenType::R).is_ok());
        let e = check(&issue(TokenType::R, 3600).token, TokenType::W).unwrap_err();
        assert_eq!(e, TokenInvalid::new(TokenInvalidCode::PermissionMismatch, Some(TokenType::W)));
        assert_eq!(e.notice_json(), r#"{"code":5,"type":"W"}"#);
        assert_eq!(g.expire_notice_json(), format!(r#"{{"expireTime":{},"type":"RW"}}"#, g.expire_ms));
    }

    #[test]
    fn expired_and_revoked() {
        let t = issue(TokenType::R, 60);
        let at = |ms: i64| validate(&key(), &t.token, TokenType::R, "ak1", ms, |_| false);
        assert!(at(NOW_MS + 59_999).is_ok());
        assert_eq!(at(NOW_MS + 60_000).unwrap_err().code, TokenInvalidCode::Expired);
        let revoked = validate(&key(), &t.token, TokenType::R, "ak1", NOW_MS, |jti| jti == t.jti);
        assert_eq!(revoked.unwrap_err().code, TokenInvalidCode::Revoked);
    }

    #[test]
    fn forged_tokens() {
        let t = issue(TokenType::RW, 3600).token;
        let other_key = validate(&Secret::new("other"), &t, TokenType::R, "ak1", NOW_MS, |_| false);
        assert_eq!(other_key.unwrap_err().code, TokenInvalidCode::BadSignature);
        // Tamper with the payload: widen the resources, keep the signature.
        let parts: Vec<&str> = t.split('.').collect();
        let mut claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["resources"] = serde_json::json!(["#"]);
        let tampered = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2]);
        assert_eq!(check(&tampered, TokenType::R).unwrap_err().code, TokenInvalidCode::BadSignature);
        // Garbage and a token for another access key: forged.
        for bad in ["", "not-a-jwt", "a.b.c", &t[..t.len() / 2]] {
            let code = check(bad, TokenType::R).unwrap_err().code;
            assert!(matches!(code, TokenInvalidCode::Forged | TokenInvalidCode::BadSignature), "{bad:?}: {code:?}");
        }
        assert_eq!(check("not-a-jwt", TokenType::R).unwrap_err().code, TokenInvalidCode::Forged);
        let err = validate(&key(), &t, TokenType::R, "ak2", NOW_MS, |_| false).unwrap_err();
        assert_eq!(err.code, TokenInvalidCode::Forged);
        // "alg: none" with our claims is refused.
        let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert_eq!(check(&none, TokenType::R).unwrap_err().code, TokenInvalidCode::Forged);
    }

    #[test]
    fn issuing_checks_ttl_and_resources() {
        let issue_with = |resources: &[String], ttl, max| {
            issue_token(&key(), "ak1", resources, TokenType::R, ttl, max, NOW).map(|_| ())
        };
        let one = res(&["a"]);
        assert!(matches!(issue_with(&one, 59, MAX_TOKEN_TTL_SECS), Err(IssueError::Ttl { .. })));
        assert!(issue_with(&one, 60, MAX_TOKEN_TTL_SECS).is_ok());
        assert!(issue_with(&one, MAX_TOKEN_TTL_SECS, MAX_TOKEN_TTL_SECS).is_ok());
        assert!(matches!(issue_with(&one, MAX_TOKEN_TTL_SECS + 1, MAX_TOKEN_TTL_SECS), Err(IssueError::Ttl { .. })));
        assert!(matches!(issue_with(&one, 3601, 3600), Err(IssueError::Ttl { .. })), "config maximum");
        let hundred: Vec<String> = (0..100).map(|i| format!("t/{i}")).collect();
        assert!(issue_with(&hundred, 60, MAX_TOKEN_TTL_SECS).is_ok());
        let too_many: Vec<String> = (0..101).map(|i| format!("t/{i}")).collect();
        assert_eq!(issue_with(&too_many, 60, MAX_TOKEN_TTL_SECS), Err(IssueError::ResourceCount(101)));
        assert_eq!(issue_with(&[], 60, MAX_TOKEN_TTL_SECS), Err(IssueError::ResourceCount(0)));
        assert!(matches!(issue_with(&res(&["a/#/b"]), 60, MAX_TOKEN_TTL_SECS), Err(IssueError::Resource(_))));
    }

    #[test]
    fn password_pairs() {
        assert_eq!(parse_password(b"R|t1").unwrap(), vec![(TokenType::R, "t1")]);
        assert_eq!(
            parse_password(b"R|t1|W|t2|RW|t3").unwrap(),
            vec![(TokenType::R, "t1"), (TokenType::W, "t2"), (TokenType::RW, "t3")]
        );
        for bad in [&b""[..], b"R", b"R|", b"X|t", b"R|t1|R|t2", b"R|a|W|b|RW|c|R|d", b"R|t|W", b"\xff|t"] {
            assert_eq!(parse_password(bad).unwrap_err().code, TokenInvalidCode::Forged, "{bad:?}");
        }
    }

    #[test]
    fn debug_output_hides_tokens() {
        let t = issue(TokenType::R, 60);
        assert!(!format!("{t:?}").contains(&t.token));
        let upload: UploadToken = serde_json::from_str(&format!(r#"{{"token":"{}","type":"RW"}}"#, t.token)).unwrap();
        assert_eq!(upload.token_type, TokenType::RW);
        assert!(!format!("{upload:?}").contains(&t.token));
    }
}
