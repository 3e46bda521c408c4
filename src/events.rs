//! Client status events (SPEC §6): `connect`, `disconnect`, `tcpclean`.
//!
//! This module only builds the events and their LMQ JSON body; writing them is the core
//! service's job ([`crate::backend::CoreService::emit_event`]), which decides how the event
//! type is carried (Kafka header `eventType`, RocketMQ tag).

use serde::Serialize;

/// Record header naming the gateway that wrote an event: the mark of an event written by a
/// gateway itself. A record built from an MQTT PUBLISH carries only the fixed LMQ header set
/// (`router::mapping::message_headers`; user properties go into the `mqtt5UserProperty` JSON
/// value), so no MQTT client can produce it. Cross-gateway takeover acts only on events that
/// carry it (`session::takeover`).
pub const GATEWAY_HEADER: &str = "lmqGateway";

/// Record header carrying the event type (Kafka consumers' `eventType`; RocketMQ: also the tag).
pub const TYPE_HEADER: &str = "eventType";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// A CONNECT was accepted.
    Connect,
    /// The client sent an MQTT DISCONNECT packet.
    Disconnect,
    /// The network connection closed, whatever the cause.
    Tcpclean,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connect => "connect",
            EventType::Disconnect => "disconnect",
            EventType::Tcpclean => "tcpclean",
        }
    }
}

/// One status event; serialises to LMQ's body
/// `{"eventType","clientId","channelId","clientIp","time"}` plus our extra fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientEvent {
    pub event_type: EventType,
    pub client_id: String,
    /// Unique per network connection, so consumers can tell two connections of one ClientId apart.
    pub channel_id: String,
    pub client_ip: String,
    /// Epoch milliseconds.
    pub time: i64,
    pub gateway_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ClientEvent {
    /// The LMQ JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    // `to_record` (the event as a core-service record) is defined in `backend`, beside
    // `CoreRecord`: this module imports nothing from the crate.
}
