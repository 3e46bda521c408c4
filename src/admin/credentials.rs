//! Device credentials (one device, one secret): register and revoke, shared by every gateway
//! through the core service.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::tokens::auth_error;
use super::{ApiError, Shared};
use crate::auth::acl::Acl;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterRequest {
    /// The one ClientId the device may connect as.
    client_id: String,
    /// Topic filters the device may publish to.
    #[serde(default)]
    publish: Vec<String>,
    /// Topic filters the device may subscribe to.
    #[serde(default)]
    subscribe: Vec<String>,
}

fn timeout(s: &Shared) -> std::time::Duration {
    std::time::Duration::from_secs(s.ctx.config.mqtt.backend_timeout_secs)
}

/// Register a credential; the secret is in this answer only.
pub(super) async fn register(
    State(s): State<Shared>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(req) = body?;
    let acl = Acl::new(req.publish, req.subscribe).map_err(|e| ApiError::bad_request("invalid_acl", e.to_string()))?;
    let new = tokio::time::timeout(timeout(&s), s.ctx.auth.register_credential(&req.client_id, acl))
        .await
        .map_err(|_| ApiError::core("no answer from the core service in time"))?
        .map_err(auth_error)?;
    let instance = s.ctx.auth.keys().instance_id().unwrap_or("lmq");
    let body = serde_json::json!({
        "access_key_id": new.access_key_id,
        "secret": new.secret.expose(),
        "client_id": new.client_id,
        "username": format!("DeviceCredential|{}|{instance}", new.access_key_id),
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// Revoke a credential; devices connected with it are disconnected.
pub(super) async fn revoke(
    State(s): State<Shared>,
    Path(access_key_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let known = tokio::time::timeout(timeout(&s), s.ctx.auth.has_credential(&access_key_id))
        .await
        .map_err(|_| ApiError::core("no answer from the core service in time"))?
        .map_err(auth_error)?;
    if !known {
        return Err(ApiError::not_found("credential_not_found", format!("no device credential `{access_key_id}`")));
    }
    tokio::time::timeout(timeout(&s), s.ctx.auth.revoke_credential(&access_key_id))
        .await
        .map_err(|_| ApiError::core("no answer from the core service in time"))?
        .map_err(auth_error)?;
    Ok(Json(serde_json::json!({ "access_key_id": access_key_id, "revoked": true })))
}
