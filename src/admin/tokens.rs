//! Token mode: issue a token for an access key, revoke one by its id (`jti`).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::{ApiError, Shared};
use crate::auth::token::{IssueError, TokenType};
use crate::auth::AuthError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IssueRequest {
    access_key_id: String,
    /// Topic filters (1 to 100).
    resources: Vec<String>,
    /// `R`, `W` or `RW`.
    #[serde(default = "default_actions")]
    actions: String,
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
}

fn default_actions() -> String {
    "R".into()
}
fn default_ttl() -> u64 {
    3600
}

pub(super) async fn issue(
    State(s): State<Shared>,
    body: Result<Json<IssueRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(req) = body?;
    let token_type = TokenType::parse(&req.actions)
        .ok_or_else(|| ApiError::bad_request("invalid_actions", "actions must be R, W or RW"))?;
    let keys = s.ctx.auth.keys();
    let issued =
        keys.issue_token(&req.access_key_id, &req.resources, token_type, req.ttl_secs).map_err(|e| match e {
            IssueError::UnknownAccessKey(_) => ApiError::not_found("unknown_access_key", e.to_string()),
            IssueError::Sign(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "sign_failed", e.to_string()),
            IssueError::Ttl { .. } => ApiError::bad_request("invalid_ttl", e.to_string()),
            IssueError::NotPermitted { .. } => ApiError::bad_request("not_permitted", e.to_string()),
            IssueError::ResourceCount(_) | IssueError::Resource(_) => {
                ApiError::bad_request("invalid_resources", e.to_string())
            }
        })?;
    let instance = keys.instance_id().unwrap_or("lmq");
    let body = serde_json::json!({
        "token": issued.token,
        "jti": issued.jti,
        "expire_ms": issued.expire_ms,
        "type": token_type.as_str(),
        "username": format!("Token|{}|{instance}", req.access_key_id),
        "password": format!("{}|{}", token_type.as_str(), issued.token),
    });
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeQuery {
    /// When the token expires on its own (ms since the epoch); the revocation is kept until
    /// then. Default: now + `auth.token.max_ttl_secs`, which outlives any token issued here.
    expire_ms: Option<i64>,
}

/// Revoke token `jti` on every gateway; clients holding it get `$SYS/tokenInvalidNotice`
/// (code 3) and are disconnected.
pub(super) async fn revoke(
    State(s): State<Shared>,
    Path(jti): Path<String>,
    query: Result<Query<RevokeQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query?;
    let max_ttl_ms = i64::try_from(s.ctx.config.auth.token.max_ttl_secs).unwrap_or(i64::MAX / 2_000) * 1000;
    let until = q.expire_ms.unwrap_or_else(|| crate::now_ms().saturating_add(max_ttl_ms));
    let timeout = std::time::Duration::from_secs(s.ctx.config.mqtt.backend_timeout_secs);
    tokio::time::timeout(timeout, s.ctx.auth.revoke_token(&jti, until))
        .await
        .map_err(|_| ApiError::core(format!("no answer from the core service within {timeout:?}")))?
        .map_err(auth_error)?;
    Ok(Json(serde_json::json!({ "jti": jti, "revoked": true, "until_ms": until })))
}

/// Errors of the authenticator's management calls.
pub(super) fn auth_error(e: AuthError) -> ApiError {
    match e {
        AuthError::Invalid(m) => ApiError::bad_request("invalid_request", m),
        AuthError::Config(e) => ApiError::bad_request("invalid_request", e.to_string()),
        AuthError::Backend(e) => ApiError::core(e),
    }
}
