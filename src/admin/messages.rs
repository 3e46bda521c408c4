//! LMQ's HTTP send: publish a message to a topic, or to one ClientId through its P2P topic
//! `<parent>/p2p/<ClientId>`. The message is stored in the core service like any PUBLISH
//! and reaches subscribers from there; the answer comes once it is durable.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use std::sync::Arc;

use super::{ApiError, Shared};
use crate::protocol::QoS;
use crate::router::mapping::{Message, Unmapped};
use crate::router::topic;

/// Publisher ClientId of messages sent through the admin API (no MQTT ClientId starts with `$`).
const ADMIN_PUBLISHER: &str = "$admin";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishRequest {
    /// Full MQTT topic; or leave out and give `client_id` and `parent`.
    topic: Option<String>,
    /// Send to this client only (P2P topic `<parent>/p2p/<client_id>`).
    client_id: Option<String>,
    /// Parent topic of the P2P topic.
    parent: Option<String>,
    #[serde(default)]
    payload: String,
    /// `utf8` (default) or `base64`.
    #[serde(default = "default_encoding")]
    payload_encoding: String,
    #[serde(default = "default_qos")]
    qos: u8,
    /// Deliver this many seconds from now (0 … 3,456,000; delayed message).
    delay_secs: Option<u64>,
    /// Deliver at this time, epoch ms (at most 40 days ahead; delayed message).
    deliver_at_ms: Option<i64>,
}

fn default_encoding() -> String {
    "utf8".into()
}
fn default_qos() -> u8 {
    1
}

pub(super) async fn publish(
    State(s): State<Shared>,
    body: Result<Json<PublishRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(req) = body?;
    let ctx = &s.ctx;
    let topic = match (req.topic, req.client_id, req.parent) {
        (Some(t), None, None) => t,
        (None, Some(c), Some(p)) => format!("{p}/p2p/{c}"),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give either `topic`, or `client_id` and `parent` (P2P)",
            ))
        }
    };
    if topic.starts_with('$') || topic::validate_name(&topic).is_err() {
        return Err(ApiError::bad_request("invalid_topic", format!("`{topic}` is not a valid topic name")));
    }
    if ctx.limits.check_topic(&topic).is_err() {
        return Err(ApiError::bad_request("topic_too_long", "the topic is longer than limits.max_topic_len"));
    }
    let qos = QoS::from_u8(req.qos).ok_or_else(|| ApiError::bad_request("invalid_qos", "qos must be 0, 1 or 2"))?;
    let payload = match req.payload_encoding.as_str() {
        "utf8" => Bytes::from(req.payload.into_bytes()),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(req.payload.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ApiError::bad_request("invalid_payload", format!("payload is not Base64: {e}")))?,
        _ => return Err(ApiError::bad_request("invalid_payload", "payload_encoding must be utf8 or base64")),
    };
    if ctx.limits.check_payload(payload.len()).is_err() {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the payload is larger than limits.max_payload_bytes",
        ));
    }
    let now = ctx.delay.clock.now_ms();
    let due = match (req.delay_secs, req.deliver_at_ms) {
        (None, None) => None,
        (Some(secs), None) if secs <= crate::delay::MAX_DELAY_SECS => Some(now + secs as i64 * 1000),
        (None, Some(at)) => Some(crate::delay::parse_start_time(&at.to_string(), now).map_err(|why| {
            ctx.delay.refused(why);
            ApiError::bad_request("invalid_delay", "deliver_at_ms must be epoch milliseconds at most 40 days ahead")
        })?),
        (Some(_), None) => {
            ctx.delay.refused(crate::labels::Refused::TooLong);
            return Err(ApiError::bad_request("invalid_delay", "delay_secs must be 0 to 3456000 (40 days)"));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("invalid_delay", "give delay_secs or deliver_at_ms, not both"))
        }
    }
    .filter(|due| *due > now);
    let parent = topic::parent(&topic);
    let core = ctx.router.topics().resolve(parent).map_err(|why| match why {
        Unmapped::Undeclared => {
            ApiError::bad_request("undeclared_parent", format!("parent topic `{parent}` is not declared"))
        }
        // Status events and state are written by gateways only, never as messages.
        Unmapped::Reserved => ApiError::bad_request("reserved_topic", format!("parent topic `{parent}` is reserved")),
    })?;
    let timeout = std::time::Duration::from_secs(ctx.config.mqtt.backend_timeout_secs);
    tokio::time::timeout(timeout, ctx.router.ensure_for_publish(&core, &topic))
        .await
        .map_err(|_| ApiError::core(format!("core topic not ready within {timeout:?}")))?
        .map_err(ApiError::core)?;
    let message = Message {
        topic: topic.as_str().into(),
        payload,
        qos,
        retain: false,
        publisher: Arc::from(ADMIN_PUBLISHER),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Default::default(),
        timestamp_ms: crate::now_ms(),
        msg_id: None,
    };
    // The one ingest path of every message (PUBLISH, will, this): record, append, trace.
    let stored = async {
        let (ack, msg_id) =
            crate::ingest::store(ctx, &core.name, Arc::new(message), None, due.map(|d| (d, now))).await?;
        Ok::<_, crate::backend::BackendError>((ack.await?, msg_id))
    };
    let (position, msg_id) =
        tokio::time::timeout(timeout, stored).await.unwrap_or(Err(crate::backend::BackendError::Timeout(timeout)))?;
    Ok(Json(serde_json::json!({
        "topic": topic,
        "core_topic": &*core.name,
        "partition": position.partition,
        "offset": position.offset,
        "msg_id": &*msg_id,
        "deliver_at_ms": due,
    })))
}
