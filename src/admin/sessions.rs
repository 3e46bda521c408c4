//! Persistent sessions in the sessions store, connected or not: look up (subscriptions,
//! backlog per partition read), reset (skip the backlog, replay from the start or from a
//! point in time) and delete.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, Shared};
use crate::backend::{StateStore, TopicPartition};
use crate::session::persist::Stored;
use crate::session::registry::Kick;

fn not_stored(client_id: &str) -> ApiError {
    ApiError::not_found("session_not_found", format!("no stored session for `{client_id}`"))
}

async fn load(s: &Shared, client_id: &str) -> Result<Stored, ApiError> {
    let value = s.ctx.backend.get_state(StateStore::Sessions, client_id).await.map_err(ApiError::core)?;
    value.as_deref().and_then(Stored::decode).ok_or_else(|| not_stored(client_id))
}

/// The stored session: owner, expiry, subscriptions, and per partition it reads the position
/// it has acknowledged up to and the backlog (records after it).
pub(super) async fn get_one(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let stored = load(&s, &client_id).await?;
    let mut positions = Vec::with_capacity(stored.positions.len());
    let mut backlog_total = 0u64;
    for p in &stored.positions {
        let tp = TopicPartition::new(p.topic.clone(), p.partition);
        let end = s.ctx.backend.end_offset(&tp).await.ok();
        let backlog = end.map(|e| e.saturating_sub(p.committed));
        backlog_total += backlog.unwrap_or(0);
        positions.push(serde_json::json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "end": end,
            "backlog": backlog,
        }));
    }
    let subscriptions: Vec<serde_json::Value> =
        stored.subscriptions.iter().map(|sub| serde_json::json!({ "filter": sub.filter, "qos": sub.qos })).collect();
    Ok(Json(serde_json::json!({
        "client_id": client_id,
        "connected_here": s.ctx.registry.get(&client_id).is_some(),
        "owner": stored.owner,
        "expiry_secs": stored.expiry_secs,
        "disconnected_at_ms": stored.disconnected_at_ms,
        "subscriptions": subscriptions,
        "positions": positions,
        "backlog": backlog_total,
        "inflight": stored.inflight.len(),
    })))
}

/// Where `POST /api/v1/sessions/{client_id}/reset` moves a session.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetRequest {
    /// `latest`: skip the backlog; `earliest`: replay everything the core service still holds;
    /// `time`: replay from the first message stored at or after `time_ms`.
    to: String,
    time_ms: Option<i64>,
}

/// Where a reset moves each position.
#[derive(Debug, Clone, Copy)]
enum Target {
    Latest,
    Earliest,
    Time(i64),
}

/// Longest a reset waits for a connected client to end and save its session.
const KICK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn connected_here(client_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "session_connected",
        format!("`{client_id}` is connected to this gateway; kick it first (DELETE /api/v1/clients/{{client_id}})"),
    )
}

/// Move a stored session's position in every partition it reads: to the end (it gets none
/// of its backlog when it returns) or to the start of what the core service holds. Messages
/// it had in flight are dropped with the old positions (a PUBREL it owes is kept).
pub(super) async fn reset(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
    body: Result<Json<ResetRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    let target = match (req.to.as_str(), req.time_ms) {
        ("latest", None) => Target::Latest,
        ("earliest", None) => Target::Earliest,
        ("time", Some(t)) => Target::Time(t),
        ("time", None) => return Err(ApiError::bad_request("invalid_reset", "`to: time` needs `time_ms`")),
        (other, _) => {
            return Err(ApiError::bad_request(
                "invalid_reset",
                format!("`to` must be `latest`, `earliest` or `time` (with `time_ms` only), not `{other}`"),
            ))
        }
    };
    // A client connected here is disconnected first (MQTT 5: 0x98 administrative action)
    // and its session saved; it finds the new position when it reconnects.
    let kicked = s.ctx.registry.kick_and_wait(&client_id, Kick::Administrative, KICK_WAIT).await;
    let mut stored = load(&s, &client_id).await?;
    let core = s.ctx.backend.as_ref();
    for p in &mut stored.positions {
        let tp = TopicPartition::new(p.topic.clone(), p.partition);
        p.committed = match target {
            Target::Latest => core.end_offset(&tp).await.map_err(ApiError::core)?,
            Target::Earliest => {
                let first = core.fetch(&tp, 0, 1).await.map_err(ApiError::core)?;
                first.records.first().map_or(first.next_offset, |r| r.offset)
            }
            Target::Time(t) => crate::backend::offset_for_time(core, &tp, t).await.map_err(ApiError::core)?,
        };
        p.acked.clear();
    }
    stored.inflight.retain(|i| i.released);
    s.ctx.backend.put_state(StateStore::Sessions, &client_id, Some(stored.encode())).await.map_err(ApiError::core)?;
    let positions: Vec<serde_json::Value> = stored
        .positions
        .iter()
        .map(|p| serde_json::json!({ "topic": p.topic, "partition": p.partition, "committed": p.committed }))
        .collect();
    Ok(Json(
        serde_json::json!({ "client_id": client_id, "to": req.to, "disconnected": kicked, "positions": positions }),
    ))
}

/// Remove a stored session (its owner's next CONNECT starts afresh). A session connected to
/// this gateway is refused with 409: kick the client first (it saves its session as it goes).
pub(super) async fn delete_one(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if s.ctx.registry.get(&client_id).is_some() {
        return Err(connected_here(&client_id));
    }
    load(&s, &client_id).await?;
    s.ctx.backend.put_state(StateStore::Sessions, &client_id, None).await.map_err(ApiError::core)?;
    Ok(Json(serde_json::json!({ "client_id": client_id, "deleted": true })))
}
