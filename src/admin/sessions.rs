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
use crate::session::reset::{self, Target};

fn not_stored(client_id: &str) -> ApiError {
    ApiError::not_found("session_not_found", format!("no stored session for `{client_id}`"))
}

async fn load(s: &Shared, client_id: &str) -> Result<Stored, ApiError> {
    let value = s.ctx.backend.get_state(StateStore::Sessions, client_id).await.map_err(ApiError::core)?;
    value.as_deref().and_then(Stored::decode).ok_or_else(|| not_stored(client_id))
}

/// The stored session: owner, expiry, subscriptions with their backlog, and per partition it
/// reads the position it has acknowledged up to, the backlog (records after it that it has
/// not acknowledged) and the time of the oldest of them.
pub(super) async fn get_one(
    State(s): State<Shared>,
    Path(client_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let stored = load(&s, &client_id).await?;
    let core = s.ctx.backend.as_ref();
    let mut positions = Vec::with_capacity(stored.positions.len());
    let mut backlogs: Vec<(String, u64)> = Vec::with_capacity(stored.positions.len());
    let mut oldest: Option<i64> = None;
    for p in &stored.positions {
        let tp = TopicPartition::new(p.topic.clone(), p.partition);
        let end = core.end_offset(&tp).await.ok();
        let backlog = end.map(|e| {
            let acked = p.acked.iter().filter(|o| **o >= p.committed && **o < e).count() as u64;
            e.saturating_sub(p.committed).saturating_sub(acked)
        });
        // The oldest message not acknowledged: the one at the committed position.
        let oldest_ms = match backlog {
            Some(n) if n > 0 => core
                .fetch(&tp, p.committed, 1)
                .await
                .ok()
                .and_then(|f| f.records.first().map(|r| r.record.timestamp_ms)),
            _ => None,
        };
        if let Some(t) = oldest_ms {
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        backlogs.push((p.topic.clone(), backlog.unwrap_or(0)));
        positions.push(serde_json::json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "end": end,
            "backlog": backlog,
            "oldest_ms": oldest_ms,
        }));
    }
    let backlog_total: u64 = backlogs.iter().map(|(_, n)| n).sum();
    let subscriptions: Vec<serde_json::Value> = stored
        .subscriptions
        .iter()
        .map(|sub| {
            // A shared subscription's messages belong to its group: no backlog of its own.
            let backlog = (!sub.filter.starts_with("$share/")).then(|| {
                let topics = s.ctx.router.core_topics_for_filter(&sub.filter).unwrap_or_default();
                backlogs.iter().filter(|(t, _)| topics.iter().any(|c| *c.name == **t)).map(|(_, n)| n).sum::<u64>()
            });
            serde_json::json!({ "filter": sub.filter, "qos": sub.qos, "backlog": backlog })
        })
        .collect();
    let here = s.ctx.registry.get(&client_id).is_some();
    Ok(Json(serde_json::json!({
        "client_id": client_id,
        "connected": stored.disconnected_at_ms.is_none(),
        "connected_here": here,
        "gateway": here.then_some(&s.ctx.gateway_id),
        "owner": stored.owner,
        "expiry_secs": stored.expiry_secs,
        "disconnected_at_ms": stored.disconnected_at_ms,
        "subscriptions": subscriptions,
        "positions": positions,
        "backlog": backlog_total,
        "oldest_unacked_age_ms": oldest.map(|t| (crate::now_ms() - t).max(0)),
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
        ("time", Some(time_ms)) => Target::Time { time_ms },
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
    let core = s.ctx.backend.as_ref();
    let stored = reset::reset_stored(core, &client_id, target).await.map_err(ApiError::core)?;
    let stored = stored.ok_or_else(|| not_stored(&client_id))?;
    // Saved as connected and not here: connected to another gateway (or it died); that
    // gateway applies the reset again once it has disconnected the client.
    let forwarded = !kicked && stored.disconnected_at_ms.is_none();
    if forwarded {
        let control = reset::control_topic(&s.ctx.config.topics.reserved_prefix);
        let command = reset::Command { client_id: client_id.clone(), target, gateway_id: s.ctx.gateway_id.clone() };
        reset::forward(core, &control, &command).await.map_err(ApiError::core)?;
    }
    let positions: Vec<serde_json::Value> = stored
        .positions
        .iter()
        .map(|p| serde_json::json!({ "topic": p.topic, "partition": p.partition, "committed": p.committed }))
        .collect();
    Ok(Json(serde_json::json!({
        "client_id": client_id,
        "to": req.to,
        "disconnected": kicked,
        "forwarded": forwarded,
        "positions": positions,
    })))
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
