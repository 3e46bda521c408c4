//! [`CoreRecord`] ↔ RocketMQ message.
//!
//! A record becomes a message with: body = value; `KEYS` = the key; the tag given by the
//! caller; every header whose value is text as a user property of the same name (LMQ's
//! `topic`, `mqttSecondTopic`, `qoslevel`, `clientId`, `mqtt5UserProperty`, ... so LMQ-style
//! consumers read them unchanged); and one more property, [`ENVELOPE`], carrying key, headers
//! (in order, binary-safe) and timestamp exactly, so the gateway reads back the very record it
//! wrote. A message written by any other RocketMQ application has no envelope: its key is
//! `KEYS`, its headers are its user properties (sorted by name) and its time the born time.
//!
//! RocketMQ refuses empty bodies, so an empty value is sent as one zero byte and the envelope
//! says so; other applications see that byte.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use cheetah_string::CheetahString;
use rocketmq_model::common::message::message_builder::MessageBuilder;
use rocketmq_model::common::message::message_ext::MessageExt;
use rocketmq_model::common::message::message_single::Message;
use rocketmq_model::common::message::{MessageTrait, STRING_HASH_SET};

use crate::backend::CoreRecord;

/// User property holding the exact record (JSON, see [`Envelope`]).
pub const ENVELOPE: &str = "lmqRecord";

/// The exact key, headers and time of a record written by the gateway.
#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope {
    /// Timestamp, epoch milliseconds.
    t: i64,
    /// Key, base64; absent = no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    /// Headers in order: name, base64 value.
    #[serde(default)]
    h: Vec<(String, String)>,
    /// The value is empty (the body holds one placeholder byte).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    z: bool,
}

/// Whether a property value survives RocketMQ's property encoding (`name\x01value\x02`).
fn plain_property_ok(name: &str, value: &str) -> bool {
    !name.is_empty()
        && !value.is_empty()
        && name != ENVELOPE
        && !STRING_HASH_SET.contains(name)
        && !name.contains(['\u{1}', '\u{2}'])
        && !value.contains(['\u{1}', '\u{2}'])
}

/// The message for `record` on `topic` with `tag`.
pub fn to_message(topic: &str, record: &CoreRecord, tag: &str) -> Message {
    let envelope = Envelope {
        t: record.timestamp_ms,
        k: record.key.as_ref().map(|k| B64.encode(k)),
        h: record.headers.iter().map(|(n, v)| (n.clone(), B64.encode(v))).collect(),
        z: record.value.is_empty(),
    };
    let body = if record.value.is_empty() { Bytes::from_static(&[0]) } else { record.value.clone() };
    let mut builder = MessageBuilder::new().topic(topic).body(body);
    if !tag.is_empty() {
        builder = builder.tags(tag);
    }
    if let Some(key) = record.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()).filter(|k| !k.trim().is_empty()) {
        builder = builder.key(key);
    }
    let mut msg = builder.build_unchecked();
    for (name, value) in &record.headers {
        let Ok(value) = std::str::from_utf8(value) else { continue };
        if plain_property_ok(name, value) {
            // Checked above; a refusal would only drop this plain copy (the envelope has it).
            let _ = msg.put_user_property(CheetahString::from_string(name.clone()), CheetahString::from_slice(value));
        }
    }
    let envelope = serde_json::to_string(&envelope).unwrap_or_default();
    let _ = msg.put_user_property(CheetahString::from_static_str(ENVELOPE), CheetahString::from_string(envelope));
    msg
}

/// The record a stored message stands for.
pub fn from_message(msg: &MessageExt) -> CoreRecord {
    let inner = msg.message_inner();
    let body = msg.body().unwrap_or_default();
    if let Some(envelope) = inner.property(ENVELOPE).and_then(|e| serde_json::from_str::<Envelope>(e).ok()) {
        let decode = |s: &str| B64.decode(s).ok().map(Bytes::from);
        let headers: Option<Vec<(String, Bytes)>> =
            envelope.h.iter().map(|(n, v)| decode(v).map(|v| (n.clone(), v))).collect();
        if let Some(headers) = headers {
            return CoreRecord {
                key: envelope.k.as_deref().and_then(decode),
                headers,
                value: if envelope.z { Bytes::new() } else { body },
                timestamp_ms: envelope.t,
            };
        }
    }
    let props = msg.properties();
    let mut headers: Vec<(String, Bytes)> = props
        .iter()
        .filter(|(n, _)| !STRING_HASH_SET.contains(n.as_str()) && n.as_str() != ENVELOPE)
        .map(|(n, v)| (n.to_string(), Bytes::from(v.to_string())))
        .collect();
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let key = inner.property("KEYS").filter(|k| !k.is_empty()).map(|k| Bytes::from(k.to_owned()));
    CoreRecord { key, headers, value: body, timestamp_ms: msg.born_timestamp() }
}

/// The tag of an MQTT message: the topic's second level (`room1` of `sensors/room1/temp`)
/// when it is a usable tag, else `default_tag`.
pub fn tag_for(record: &CoreRecord, default_tag: &str) -> String {
    let second = record
        .header("topic")
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.split('/').nth(1))
        .filter(|l| !l.is_empty() && !l.contains(['|', ' ', '*', '\u{1}', '\u{2}']));
    second.unwrap_or(default_tag).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_second_level_or_default() {
        let rec = |t: &str| CoreRecord {
            key: None,
            headers: vec![("topic".into(), Bytes::from(t.to_owned()))],
            value: Bytes::new(),
            timestamp_ms: 0,
        };
        assert_eq!(tag_for(&rec("sensors/room1/temp"), "mqtt"), "room1");
        assert_eq!(tag_for(&rec("sensors"), "mqtt"), "mqtt");
        assert_eq!(tag_for(&rec("sensors//x"), "mqtt"), "mqtt");
        assert_eq!(tag_for(&rec("a/p2p/GID_x@@@d"), "mqtt"), "p2p");
    }

    #[test]
    fn plain_properties_skip_system_names_and_separators() {
        assert!(plain_property_ok("topic", "a/b"));
        assert!(!plain_property_ok("KEYS", "x"));
        assert!(!plain_property_ok("TAGS", "x"));
        assert!(!plain_property_ok("p", "a\u{1}b"));
        assert!(!plain_property_ok(ENVELOPE, "x"));
    }
}
