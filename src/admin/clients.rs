//! Clients connected to this gateway instance: list, look up, kick.

use axum::extract::{Path, State};
use axum::Json;

use super::{ApiError, Shared};
use crate::session::registry::Kick;

pub(super) async fn list(State(s): State<Shared>) -> Json<serde_json::Value> {
    let clients: Vec<serde_json::Value> =
        s.ctx.registry.list().iter().map(|c| serde_json::to_value(&**c).unwrap_or_default()).collect();
    Json(serde_json::json!({ "gateway_id": s.ctx.gateway_id, "count": clients.len(), "clients": clients }))
}

fn not_connected(client_id: &str) -> ApiError {
    ApiError::not_found("client_not_found", format!("`{client_id}` is not connected to this gateway"))
}

pub(super) async fn get_one(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let info = s.ctx.registry.get(&client_id).ok_or_else(|| not_connected(&client_id))?;
    Ok(Json(serde_json::to_value(&*info).unwrap_or_default()))
}

/// Disconnect the client (MQTT 5: DISCONNECT 0x98); its `tcpclean` event says `kicked`.
pub(super) async fn kick(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !s.ctx.registry.kick(&client_id, Kick::Administrative) {
        return Err(not_connected(&client_id));
    }
    Ok(Json(serde_json::json!({ "client_id": client_id, "kicked": true })))
}
