//! Message query (SPEC §10): one message by its ID, or pages of messages by topic (name or
//! filter), time range and key. The search itself is `crate::query`; this turns HTTP into it
//! and its results into JSON, cutting payloads above `admin.query_max_payload_bytes`.

use axum::extract::{Path, Query, State};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;

use super::{ApiError, Shared};
use crate::query::{self, Cursor, Found, QueryError, Search};
use crate::router::RouterError;

/// Most messages in one page, and the default.
const MAX_LIMIT: usize = 500;
const DEFAULT_LIMIT: usize = 50;

/// A found message as the API shows it.
fn message_json(f: &Found, max_payload: usize) -> serde_json::Value {
    let payload = &f.message.payload;
    let shown = &payload[..payload.len().min(max_payload)];
    serde_json::json!({
        "msgId": f.msg_id,
        "topic": &*f.message.topic,
        "clientId": &*f.message.publisher,
        "qos": f.message.qos as u8,
        "retain": f.message.retain,
        "time_ms": f.message.timestamp_ms,
        "size": payload.len(),
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(shown),
        "truncated": shown.len() < payload.len(),
        "core_topic": &*f.tp.topic,
        "partition": f.tp.partition,
        "offset": f.offset,
    })
}

fn router_error(e: RouterError) -> ApiError {
    match e {
        RouterError::UndeclaredParent(p) => {
            ApiError::not_found("undeclared_parent", format!("parent topic `{p}` is not declared in topics.parents"))
        }
        RouterError::Reserved(_) => ApiError::bad_request("reserved_topic", "reserved topics cannot be queried"),
        other => ApiError::core(other),
    }
}

fn query_error(e: QueryError) -> ApiError {
    match e {
        QueryError::BadFilter(f) => ApiError::bad_request("invalid_topic", format!("`{f}` is not a topic or filter")),
        QueryError::BadCursor => ApiError::bad_request("invalid_cursor", "the cursor does not belong to this search"),
        QueryError::Core(e) => ApiError::core(e),
    }
}

/// `GET /api/v1/messages/{msg_id}`.
pub(super) async fn by_id(
    State(s): State<Shared>,
    Path(msg_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if query::id_time(&msg_id).is_none() {
        return Err(ApiError::bad_request("invalid_msg_id", "a message ID is 32 hexadecimal digits"));
    }
    let admin = &s.ctx.config.admin;
    let searched = s.ctx.router.core_topics_for_filter("#").map_err(router_error)?;
    let topics = s.ctx.router.topics();
    let hit =
        query::by_id(s.ctx.backend.as_ref(), topics, &searched, &msg_id.to_ascii_uppercase(), admin.query_max_scan)
            .await
            .map_err(ApiError::core)?;
    match hit {
        Some(f) => Ok(Json(message_json(&f, admin.query_max_payload_bytes))),
        None => Err(ApiError::not_found("message_not_found", format!("no stored message has ID `{msg_id}`"))),
    }
}

/// `GET /api/v1/messages/{msg_id}/trace`: the message's trace events, oldest first (none
/// when it was not traced: tracing off, or not in the sample).
pub(super) async fn trace(
    State(s): State<Shared>,
    Path(msg_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if query::id_time(&msg_id).is_none() {
        return Err(ApiError::bad_request("invalid_msg_id", "a message ID is 32 hexadecimal digits"));
    }
    let msg_id = msg_id.to_ascii_uppercase();
    let trace = &s.ctx.config.trace;
    let (events, complete) = query::trace_of(
        s.ctx.backend.as_ref(),
        (&trace.topic, trace.partitions, trace.retention_ms()),
        &msg_id,
        s.ctx.config.admin.query_max_scan,
    )
    .await
    .map_err(ApiError::core)?;
    Ok(Json(serde_json::json!({ "msgId": msg_id, "events": events, "complete": complete })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchParams {
    topic: String,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    key: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/messages?topic=&from_ms=&to_ms=&key=&limit=&cursor=`.
pub(super) async fn search(
    State(s): State<Shared>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let cursor = match &p.cursor {
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| query_error(QueryError::BadCursor))?),
        None => None,
    };
    let search = Search {
        filter: p.topic,
        from_ms: p.from_ms.unwrap_or(0),
        to_ms: p.to_ms.unwrap_or_else(crate::now_ms),
        key: p.key.filter(|k| !k.is_empty()),
        limit: p.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
    };
    if search.from_ms > search.to_ms {
        return Err(ApiError::bad_request("invalid_range", "from_ms is after to_ms"));
    }
    if search.filter.starts_with("$share/") || crate::router::topic::validate_filter(&search.filter).is_err() {
        return Err(query_error(QueryError::BadFilter(search.filter)));
    }
    let admin = &s.ctx.config.admin;
    let searched = s.ctx.router.core_topics_for_filter(&search.filter).map_err(router_error)?;
    for t in &searched {
        s.ctx.router.ensure_known(t).await.map_err(router_error)?;
    }
    let page = query::page(
        s.ctx.backend.as_ref(),
        s.ctx.router.topics(),
        &searched,
        &search,
        cursor.as_ref(),
        admin.query_max_scan,
    )
    .await
    .map_err(query_error)?;
    let messages: Vec<serde_json::Value> =
        page.found.iter().map(|f| message_json(f, admin.query_max_payload_bytes)).collect();
    Ok(Json(serde_json::json!({
        "messages": messages,
        "next": page.next.map(|c| c.encode()),
    })))
}
