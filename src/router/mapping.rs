//! Mapping between MQTT messages and core-service records (SPEC §2).
//!
//! Parent topic → core-service topic, record key, and the LMQ header names
//! (`topic`, `mqttSecondTopic`, `qoslevel`, `clientId`, `mqtt5UserProperty`, ...), so that
//! applications migrating from LMQ read the same fields. Also the other direction: any record
//! in a parent topic's core-service topic — written by a gateway or by any application —
//! becomes an MQTT message.
//!
//! Every parent → core-topic mapping goes through [`TopicMap::resolve`], which keeps MQTT
//! clients out of the reserved namespace ([`crate::config::reserved`]); every core topic → parent
//! mapping goes through [`TopicMap::parent_of_core`], which never names a reserved topic, so a
//! record of the events or a state topic is never taken for a message.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::Arc;

use crate::backend::CoreRecord;
use crate::config::reserved::ReservedTopics;
use crate::config::{Naming, RecordKey, TopicsConfig};
use crate::protocol::{LastWill, Publish, PublishProperties, QoS, UserProperties};

/// Header names (LMQ's, plus ours for what LMQ has no name for).
pub mod header {
    pub const TOPIC: &str = "topic";
    pub const SECOND_TOPIC: &str = "mqttSecondTopic";
    pub const QOS: &str = "qoslevel";
    pub const CLIENT_ID: &str = "clientId";
    pub const USER_PROPERTY: &str = "mqtt5UserProperty";
    pub const EXPIRY: &str = "mqtt5MsgExpireInterval";
    pub const CONTENT_TYPE: &str = "mqtt5ContentType";
    pub const RETAIN: &str = "retain";
    pub const RESPONSE_TOPIC: &str = "mqtt5ResponseTopic";
    pub const CORRELATION_DATA: &str = "mqtt5CorrelationData";
    pub const PAYLOAD_FORMAT: &str = "mqtt5PayloadFormatIndicator";
    /// Identifies the QoS 2 PUBLISH of a persistent session that wrote the record, so that a
    /// session restored after a crash finds whether a re-sent PUBLISH is stored already.
    pub const QOS2_ID: &str = "lmqQos2Id";
}

/// An application message as the router and sessions see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// ClientId of the publisher (empty for records written by other applications).
    pub publisher: Arc<str>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
    /// When the message was published, epoch ms.
    pub timestamp_ms: i64,
    /// The message's ID (record header `msgId`) once it was stored; `None` before, and for
    /// records written by other applications.
    pub msg_id: Option<Arc<str>>,
}

impl Message {
    /// The message a client's PUBLISH carries (its user properties are taken), published by
    /// `publisher` at `now_ms`.
    pub fn from_publish(p: &mut Publish, publisher: Arc<str>, now_ms: i64) -> Message {
        Message {
            topic: p.topic.as_str().into(),
            payload: p.payload.clone(),
            qos: p.qos,
            retain: p.retain,
            publisher,
            payload_format_indicator: p.properties.payload_format_indicator,
            message_expiry_interval: p.properties.message_expiry_interval,
            content_type: p.properties.content_type.clone(),
            response_topic: p.properties.response_topic.clone(),
            correlation_data: p.properties.correlation_data.clone(),
            user_properties: std::mem::take(&mut p.properties.user_properties),
            timestamp_ms: now_ms,
            msg_id: None,
        }
    }

    /// The message of a client's will, published by `publisher` at `now_ms`.
    pub fn from_will(will: &LastWill, publisher: Arc<str>, now_ms: i64) -> Message {
        Message {
            topic: will.topic.as_str().into(),
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            publisher,
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            content_type: will.properties.content_type.clone(),
            response_topic: will.properties.response_topic.clone(),
            correlation_data: will.properties.correlation_data.clone(),
            user_properties: will.properties.user_properties.clone(),
            timestamp_ms: now_ms,
            msg_id: None,
        }
    }

    /// When a message with an expiry interval of `secs` expires. Saturating: the time is a
    /// record's, set by whoever produced it.
    fn expires_at(&self, secs: u32) -> i64 {
        self.timestamp_ms.saturating_add(i64::from(secs) * 1000)
    }

    /// Whether the message expiry interval has passed at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        match self.message_expiry_interval {
            Some(secs) => now_ms >= self.expires_at(secs),
            None => false,
        }
    }

    /// PUBLISH properties to send to a subscriber at `now_ms` (expiry counts down).
    pub fn publish_properties(&self, now_ms: i64) -> PublishProperties {
        let message_expiry_interval = self.message_expiry_interval.map(|secs| {
            let left = self.expires_at(secs).saturating_sub(now_ms).max(0) / 1000;
            u32::try_from(left).unwrap_or(secs).max(1)
        });
        PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval,
            topic_alias: None,
            response_topic: self.response_topic.clone(),
            correlation_data: self.correlation_data.clone(),
            user_properties: self.user_properties.clone(),
            subscription_identifiers: Vec::new(),
            content_type: self.content_type.clone(),
        }
    }
}

/// Where a parent topic is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreTopic {
    pub name: Arc<str>,
    pub partitions: u32,
}

/// Why a parent topic has no core topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmapped {
    /// Not declared in `topics.parents` (and no `*`).
    Undeclared,
    /// The parent or its core topic is in the reserved namespace: never reachable over MQTT.
    Reserved,
}

/// Parent topics declared in `gateway.yaml`, resolved to core-service topics.
#[derive(Debug, Clone)]
pub struct TopicMap {
    declared: HashMap<String, CoreTopic>,
    /// Core topic → parent topic, for declared parents.
    by_core: HashMap<String, String>,
    /// `*` declared: any parent maps to a core topic of the same name.
    any: Option<u32>,
    /// `naming: mqtt` with `*`: the core topic of parents that cannot be core-topic names.
    other: Option<Arc<str>>,
    naming: Naming,
    key: RecordKey,
    reserved: ReservedTopics,
}

impl TopicMap {
    /// `reserved`: the configuration's reserved namespace (`Config::reserved_topics`).
    pub fn new(config: &TopicsConfig, reserved: ReservedTopics) -> TopicMap {
        let mut declared = HashMap::new();
        let mut any = None;
        for p in &config.parents {
            if p.name == "*" {
                any = Some(p.partitions);
            } else {
                let name = p.core_topic.clone().unwrap_or_else(|| p.name.clone());
                declared.insert(p.name.clone(), CoreTopic { name: name.into(), partitions: p.partitions });
            }
        }
        let by_core = declared.iter().map(|(p, t)| (t.name.to_string(), p.clone())).collect();
        let other = (config.naming == Naming::Mqtt && any.is_some()).then(|| config.other_core_topic.as_str().into());
        TopicMap { declared, by_core, any, other, naming: config.naming, key: config.record_key, reserved }
    }

    /// Core topic for a parent topic. A parent whose own name or core topic is reserved is
    /// refused even when declared (config validation refuses such declarations; this is the
    /// check every path relies on), and `*` never maps onto a reserved name.
    pub fn resolve(&self, parent: &str) -> Result<CoreTopic, Unmapped> {
        if self.reserved.contains(parent) || (self.naming == Naming::Mqtt && parent == "$SYS") {
            return Err(Unmapped::Reserved);
        }
        let topic = match (self.declared.get(parent), self.any, &self.other) {
            (Some(t), _, _) => t.clone(),
            (None, Some(partitions), _) if is_safe_core_name(parent) => CoreTopic { name: parent.into(), partitions },
            (None, Some(partitions), Some(other)) => CoreTopic { name: other.clone(), partitions },
            _ => return Err(Unmapped::Undeclared),
        };
        if self.reserved.contains(&topic.name) {
            return Err(Unmapped::Reserved);
        }
        Ok(topic)
    }

    /// Core topic for a parent topic, or `None` when the parent is not declared or reserved.
    pub fn core_topic(&self, parent: &str) -> Option<CoreTopic> {
        self.resolve(parent).ok()
    }

    /// The target ClientId of a P2P topic (`<parent>/p2p/<ClientId>`, LMQ's); with
    /// `naming: mqtt` such a topic is an ordinary one and this is `None`.
    pub fn p2p_target<'a>(&self, topic: &'a str) -> Option<&'a str> {
        if self.naming == Naming::Mqtt {
            return None;
        }
        p2p_target(topic)
    }

    /// Whether a core-service topic belongs to a parent declared by name (not through `*`).
    pub fn is_declared_core(&self, core: &str) -> bool {
        self.by_core.contains_key(core)
    }

    /// Whether a core-service topic is in the reserved namespace.
    pub fn is_reserved(&self, core: &str) -> bool {
        self.reserved.contains(core)
    }

    /// Parent topics declared by name (without `*`).
    pub fn declared(&self) -> impl Iterator<Item = (&str, &CoreTopic)> {
        self.declared.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether any parent topic is accepted.
    pub fn accepts_any(&self) -> bool {
        self.any.is_some()
    }

    /// The MQTT message a record of core topic `core` stands for (called per routed record),
    /// `None` for a record of a reserved topic or whose topic belongs to another core topic.
    /// Records of `topics.other_core_topic` (`naming: mqtt`) carry parents of many names: the
    /// record's `topic` header says which, and that parent must map to this core topic.
    pub fn message_of(&self, core: &str, rec: &CoreRecord) -> Option<Message> {
        if self.other.as_deref() == Some(core) && !self.by_core.contains_key(core) {
            let topic = header_str(rec, header::TOPIC)?;
            let parent = super::topic::parent(topic);
            if self.resolve(parent).ok()?.name.as_ref() != core {
                return None;
            }
            return record_to_message(parent, rec);
        }
        record_to_message(self.parent_of_core(core)?, rec)
    }

    /// Parent topic whose records live in core topic `core` (no allocation). `None` for a
    /// reserved topic: its records are never messages.
    fn parent_of_core<'a>(&'a self, core: &'a str) -> Option<&'a str> {
        if self.reserved.contains(core) {
            return None;
        }
        if let Some(parent) = self.by_core.get(core) {
            return Some(parent.as_str()).filter(|p| !self.reserved.contains(p));
        }
        self.any.map(|_| core)
    }

    /// Build the record for a message, with a new message ID ([`crate::msgid`]).
    pub fn to_record(&self, msg: &Message) -> CoreRecord {
        let key = match self.key {
            RecordKey::ClientId if !msg.publisher.is_empty() => Some(Bytes::copy_from_slice(msg.publisher.as_bytes())),
            RecordKey::Topic => Some(Bytes::copy_from_slice(msg.topic.as_bytes())),
            _ => None,
        };
        let mut headers = message_headers(msg);
        headers.push((crate::msgid::HEADER.to_string(), Bytes::from(crate::msgid::next(msg.timestamp_ms))));
        CoreRecord { key, headers, value: msg.payload.clone(), timestamp_ms: msg.timestamp_ms }
    }
}

/// Core topic names are also file names (embedded) and Kafka topic names.
fn is_safe_core_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// The LMQ headers of a message.
pub fn message_headers(msg: &Message) -> Vec<(String, Bytes)> {
    let mut h = Vec::with_capacity(6);
    let s = |v: &str| Bytes::copy_from_slice(v.as_bytes());
    h.push((header::TOPIC.to_string(), s(&msg.topic)));
    let second = match msg.topic.find('/') {
        Some(i) => &msg.topic[i..],
        None => "",
    };
    if !second.is_empty() {
        h.push((header::SECOND_TOPIC.to_string(), s(second)));
    }
    h.push((header::QOS.to_string(), s(&(msg.qos as u8).to_string())));
    if !msg.publisher.is_empty() {
        h.push((header::CLIENT_ID.to_string(), s(&msg.publisher)));
    }
    if msg.retain {
        h.push((header::RETAIN.to_string(), s("true")));
    }
    if !msg.user_properties.is_empty() {
        let arr: Vec<serde_json::Value> =
            msg.user_properties.iter().map(|(k, v)| serde_json::json!({"key": k, "value": v})).collect();
        h.push((header::USER_PROPERTY.to_string(), Bytes::from(serde_json::Value::Array(arr).to_string())));
    }
    if let Some(e) = msg.message_expiry_interval {
        h.push((header::EXPIRY.to_string(), s(&e.to_string())));
    }
    if let Some(ct) = &msg.content_type {
        h.push((header::CONTENT_TYPE.to_string(), s(ct)));
    }
    if let Some(rt) = &msg.response_topic {
        h.push((header::RESPONSE_TOPIC.to_string(), s(rt)));
    }
    if let Some(cd) = &msg.correlation_data {
        h.push((header::CORRELATION_DATA.to_string(), cd.clone()));
    }
    if let Some(pf) = msg.payload_format_indicator {
        h.push((header::PAYLOAD_FORMAT.to_string(), s(&pf.to_string())));
    }
    h
}

fn header_str<'a>(rec: &'a CoreRecord, name: &str) -> Option<&'a str> {
    rec.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Turn a record of parent topic `parent` into an MQTT message (SPEC §2, cloud-to-device):
/// topic = `topic` header, else parent + `mqttSecondTopic`, else the parent; QoS =
/// `qoslevel` (default 1). Returns `None` for a record whose topic is not a valid MQTT topic
/// name of that parent.
pub fn record_to_message(parent: &str, rec: &CoreRecord) -> Option<Message> {
    let topic: Arc<str> = match header_str(rec, header::TOPIC) {
        Some(t) => t.into(),
        None => match header_str(rec, header::SECOND_TOPIC) {
            Some(second) if second.starts_with('/') => format!("{parent}{second}").into(),
            Some(second) => format!("{parent}/{second}").into(),
            None => parent.into(),
        },
    };
    if super::topic::validate_name(&topic).is_err() || super::topic::parent(&topic) != parent {
        return None;
    }
    let qos = header_str(rec, header::QOS)
        .and_then(|q| q.trim().parse::<u8>().ok())
        .and_then(QoS::from_u8)
        .unwrap_or(QoS::AtLeastOnce);
    let user_properties = header_str(rec, header::USER_PROPERTY)
        .and_then(|j| serde_json::from_str::<Vec<serde_json::Value>>(j).ok())
        .map(|arr| {
            arr.iter()
                .filter_map(|v| Some((v.get("key")?.as_str()?.to_string(), v.get("value")?.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Some(Message {
        topic,
        payload: rec.value.clone(),
        qos,
        retain: header_str(rec, header::RETAIN) == Some("true"),
        publisher: header_str(rec, header::CLIENT_ID).unwrap_or("").into(),
        payload_format_indicator: header_str(rec, header::PAYLOAD_FORMAT).and_then(|v| v.parse().ok()),
        message_expiry_interval: header_str(rec, header::EXPIRY).and_then(|v| v.parse().ok()),
        content_type: header_str(rec, header::CONTENT_TYPE).map(str::to_string),
        response_topic: header_str(rec, header::RESPONSE_TOPIC).map(str::to_string),
        correlation_data: rec.header(header::CORRELATION_DATA).cloned(),
        user_properties,
        timestamp_ms: rec.timestamp_ms,
        msg_id: header_str(rec, crate::msgid::HEADER).map(Arc::from),
    })
}

/// Encode a record as a state-store value (retained messages).
pub fn encode_record(rec: &CoreRecord) -> Bytes {
    let mut b = BytesMut::with_capacity(32 + rec.value.len());
    b.put_i64(rec.timestamp_ms);
    match &rec.key {
        Some(k) => {
            b.put_u32(k.len() as u32);
            b.put_slice(k);
        }
        None => b.put_u32(u32::MAX),
    }
    b.put_u32(rec.headers.len() as u32);
    for (k, v) in &rec.headers {
        b.put_u32(k.len() as u32);
        b.put_slice(k.as_bytes());
        b.put_u32(v.len() as u32);
        b.put_slice(v);
    }
    b.put_u32(rec.value.len() as u32);
    b.put_slice(&rec.value);
    b.freeze()
}

/// Decode [`encode_record`]'s output; `None` if it is corrupt.
pub fn decode_record(mut b: Bytes) -> Option<CoreRecord> {
    fn take(b: &mut Bytes) -> Option<Bytes> {
        if b.remaining() < 4 {
            return None;
        }
        let n = b.get_u32() as usize;
        (b.remaining() >= n).then(|| b.split_to(n))
    }
    if b.remaining() < 12 {
        return None;
    }
    let timestamp_ms = b.get_i64();
    let key = if b.remaining() >= 4 && b[..4] == [0xff; 4] {
        b.advance(4);
        None
    } else {
        Some(take(&mut b)?)
    };
    if b.remaining() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    let mut headers = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let k = take(&mut b)?;
        let v = take(&mut b)?;
        headers.push((String::from_utf8(k.to_vec()).ok()?, v));
    }
    let value = take(&mut b)?;
    Some(CoreRecord { key, headers, value, timestamp_ms })
}

/// `<parent>/p2p/<clientId>`: the target ClientId of a P2P topic.
pub fn p2p_target(topic: &str) -> Option<&str> {
    let mut it = topic.splitn(3, '/');
    let _parent = it.next()?;
    if it.next()? != "p2p" {
        return None;
    }
    it.next().filter(|t| !t.is_empty() && !t.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ParentTopic;

    fn msg() -> Message {
        Message {
            topic: "sensors/room1/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            qos: QoS::AtLeastOnce,
            retain: true,
            publisher: "GID_dev@@@d1".into(),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("text/plain".into()),
            response_topic: Some("sensors/reply".into()),
            correlation_data: Some(Bytes::from_static(b"c1")),
            user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            timestamp_ms: 1_700_000_000_000,
            msg_id: None,
        }
    }

    /// A record's time is whatever its producer set (Kafka accepts any CreateTime): expiry
    /// at the edges of the clock neither overflows nor wraps (found by the `records` fuzz
    /// target, on a retained record).
    #[test]
    fn expiry_of_records_with_extreme_timestamps() {
        let now = 1_700_000_000_000;
        let future = Message { timestamp_ms: i64::MAX, ..msg() };
        assert!(!future.expired(now));
        assert_eq!(future.publish_properties(now).message_expiry_interval, Some(60));
        let past = Message { timestamp_ms: i64::MIN, ..msg() };
        assert!(past.expired(now));
        assert_eq!(past.publish_properties(now).message_expiry_interval, Some(1));
    }

    #[test]
    fn records_carry_lmq_headers_and_map_back() {
        let cfg = TopicsConfig::default();
        let map = TopicMap::new(&cfg, ReservedTopics::default());
        let rec = map.to_record(&msg());
        assert_eq!(rec.key.as_deref(), Some(&b"GID_dev@@@d1"[..]));
        assert_eq!(rec.header("topic").map(|v| &v[..]), Some(&b"sensors/room1/temp"[..]));
        assert_eq!(rec.header("mqttSecondTopic").map(|v| &v[..]), Some(&b"/room1/temp"[..]));
        assert_eq!(rec.header("qoslevel").map(|v| &v[..]), Some(&b"1"[..]));
        assert_eq!(rec.header("clientId").map(|v| &v[..]), Some(&b"GID_dev@@@d1"[..]));
        assert_eq!(
            rec.header("mqtt5UserProperty").map(|v| &v[..]),
            Some(&br#"[{"key":"a","value":"1"},{"key":"a","value":"2"}]"#[..])
        );
        // Back as the same message, now with the ID the record was given.
        let id = rec.header(crate::msgid::HEADER).map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(id.as_ref().map(String::len), Some(32));
        let back = record_to_message("sensors", &rec);
        assert_eq!(back, Some(Message { msg_id: id.map(Arc::from), ..msg() }));
    }

    #[test]
    fn foreign_records_get_topic_from_second_topic_or_parent() {
        let mut rec = CoreRecord { key: None, headers: vec![], value: Bytes::from_static(b"x"), timestamp_ms: 5 };
        let m = record_to_message("cmd", &rec).unwrap();
        assert_eq!(&*m.topic, "cmd");
        assert_eq!(m.qos, QoS::AtLeastOnce);
        rec.headers.push(("mqttSecondTopic".into(), Bytes::from_static(b"/dev1/set")));
        assert_eq!(&*record_to_message("cmd", &rec).unwrap().topic, "cmd/dev1/set");
        rec.headers.push(("qoslevel".into(), Bytes::from_static(b"0")));
        assert_eq!(record_to_message("cmd", &rec).unwrap().qos, QoS::AtMostOnce);
        rec.headers.push(("topic".into(), Bytes::from_static(b"other/x")));
        assert_eq!(record_to_message("cmd", &rec), None, "topic of another parent is refused");
    }

    #[test]
    fn undeclared_parents_are_refused() {
        let cfg = TopicsConfig {
            parents: vec![ParentTopic {
                name: "sensors".into(),
                core_topic: Some("iot.sensors".into()),
                partitions: 2,
            }],
            ..TopicsConfig::default()
        };
        let map = TopicMap::new(&cfg, ReservedTopics::default());
        assert_eq!(map.core_topic("sensors").map(|t| t.name), Some("iot.sensors".into()));
        assert_eq!(map.core_topic("other"), None);
        assert_eq!(map.parent_of_core("iot.sensors"), Some("sensors"));
        let any = TopicMap::new(&TopicsConfig::default(), ReservedTopics::default());
        assert!(any.core_topic("x").is_some());
        assert!(any.core_topic("..").is_none());
    }

    #[test]
    fn mqtt_names_map_unusable_first_levels_to_the_other_core_topic() {
        let cfg = TopicsConfig { naming: Naming::Mqtt, ..TopicsConfig::default() };
        let reserved = ReservedTopics::new(["GID_LMQ_STATUS"], ["lmq-"]);
        let map = TopicMap::new(&cfg, reserved.clone());
        let other = |p: &str| map.resolve(p).map(|t| t.name.to_string());
        assert_eq!(other("sensors"), Ok("sensors".into()), "usable names keep their own core topic");
        for parent in ["", "$TopicA", "a b", "温度"] {
            assert_eq!(other(parent), Ok("mqtt-other".into()), "`{parent}`");
        }
        assert_eq!(other("$SYS"), Err(Unmapped::Reserved));
        assert_eq!(other("lmq-sessions"), Err(Unmapped::Reserved));
        // Records of the shared core topic say their own topic; one of another core topic is refused.
        let mut msg = msg();
        msg.topic = "$TopicA/B".into();
        let rec = map.to_record(&msg);
        assert_eq!(map.message_of("mqtt-other", &rec).map(|m| m.topic), Some("$TopicA/B".into()));
        msg.topic = "sensors/x".into();
        assert_eq!(map.message_of("mqtt-other", &map.to_record(&msg)), None);
        // LMQ names: no such core topic.
        let lmq = TopicMap::new(&TopicsConfig::default(), reserved);
        assert_eq!(lmq.resolve("$TopicA"), Err(Unmapped::Undeclared));
        assert_eq!(lmq.resolve(""), Err(Unmapped::Undeclared));
    }

    #[test]
    fn reserved_names_are_never_mapped_either_way() {
        let reserved = ReservedTopics::new(["GID_LMQ_STATUS", "lmq-sessions"], ["lmq-"]);
        let parent = |name: &str, core: Option<&str>| ParentTopic {
            name: name.into(),
            core_topic: core.map(str::to_owned),
            partitions: 1,
        };
        let cfg = TopicsConfig {
            parents: vec![
                parent("*", None),
                parent("foo", Some("lmq-sessions")),
                parent("GID_LMQ_STATUS", Some("elsewhere")),
                parent("cmd", Some("iot.cmd")),
            ],
            ..TopicsConfig::default()
        };
        let map = TopicMap::new(&cfg, reserved);
        for p in ["GID_LMQ_STATUS", "gid_lmq_status", "lmq-credentials", "LMQ-delay", "foo"] {
            assert_eq!(map.resolve(p), Err(Unmapped::Reserved), "{p}");
            assert_eq!(map.core_topic(p), None, "{p}");
        }
        assert_eq!(map.resolve("cmd").map(|t| t.name), Ok("iot.cmd".into()));
        assert_eq!(map.resolve("sensors").map(|t| t.name), Ok("sensors".into()));
        assert_eq!(map.resolve(".."), Err(Unmapped::Undeclared));
        // Records read back from these topics are never messages.
        for core in ["GID_LMQ_STATUS", "lmq-sessions", "lmq-retained", "elsewhere"] {
            assert_eq!(map.parent_of_core(core), None, "{core}");
        }
        assert_eq!(map.parent_of_core("iot.cmd"), Some("cmd"));
        assert_eq!(map.parent_of_core("sensors"), Some("sensors"));
    }

    #[test]
    fn publishers_cannot_add_headers_of_their_own() {
        // Whatever user properties a client sends, a record from an MQTT PUBLISH carries only
        // the fixed LMQ header set: no `eventType`, no gateway marker, no state header.
        let mut m = msg();
        m.user_properties = vec![
            ("lmqGateway".into(), "forged".into()),
            ("eventType".into(), "connect".into()),
            ("lmqRecord".into(), "{}".into()),
        ];
        let rec = TopicMap::new(&TopicsConfig::default(), ReservedTopics::default()).to_record(&m);
        let fixed = [
            header::TOPIC,
            header::SECOND_TOPIC,
            header::QOS,
            header::CLIENT_ID,
            header::USER_PROPERTY,
            header::EXPIRY,
            header::CONTENT_TYPE,
            header::RETAIN,
            header::RESPONSE_TOPIC,
            header::CORRELATION_DATA,
            header::PAYLOAD_FORMAT,
            crate::msgid::HEADER,
        ];
        for (name, _) in &rec.headers {
            assert!(fixed.contains(&name.as_str()), "unexpected header {name}");
        }
        assert!(rec.header(crate::events::GATEWAY_HEADER).is_none());
    }

    #[test]
    fn record_encoding_round_trips() {
        let map = TopicMap::new(&TopicsConfig::default(), ReservedTopics::default());
        let rec = map.to_record(&msg());
        assert_eq!(decode_record(encode_record(&rec)), Some(rec.clone()));
        let nokey = CoreRecord { key: None, ..rec };
        assert_eq!(decode_record(encode_record(&nokey)), Some(nokey));
        assert_eq!(decode_record(Bytes::from_static(b"short")), None);
    }

    #[test]
    fn p2p_targets() {
        assert_eq!(p2p_target("cmd/p2p/GID_a@@@1"), Some("GID_a@@@1"));
        assert_eq!(p2p_target("cmd/x/GID_a@@@1"), None);
        assert_eq!(p2p_target("cmd/p2p"), None);
        assert_eq!(p2p_target("cmd/p2p/a/b"), None);
    }
}
