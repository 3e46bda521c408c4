//! Reset of a persistent session's positions (SPEC §10): every partition it reads moves to its
//! end (`latest`: skip the backlog), to the first record the core service still holds
//! (`earliest`) or to the first record stored at or after a time (`time`, through the core
//! service's time index). Applied to the stored session; a client connected to a gateway is
//! first disconnected there so that its final save cannot overwrite the reset.
//!
//! A reset asked on one gateway for a client connected to another is forwarded through the
//! internal control topic (`<reserved prefix>control`, one partition): every gateway follows it
//! (`session::takeover`), and the one the client is connected to disconnects it, waits for its
//! save and applies the reset again. Commands count only when a gateway wrote them (header
//! [`crate::events::GATEWAY_HEADER`] naming the gateway in the body); devices cannot write
//! reserved topics.

use bytes::Bytes;

use crate::backend::{self, BackendError, CoreRecord, CoreService, Record, StateStore, TopicPartition};
use crate::events::GATEWAY_HEADER;
use crate::session::persist::Stored;

/// Where a reset moves each position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum Target {
    Latest,
    Earliest,
    Time { time_ms: i64 },
}

/// Name of the control topic under the reserved prefix.
pub fn control_topic(reserved_prefix: &str) -> String {
    format!("{reserved_prefix}control")
}

/// Move every position of the stored session of `client_id`; `None` when there is none.
/// Messages it had in flight are dropped with the old positions (a PUBREL it owes is kept).
pub async fn reset_stored(
    core: &dyn CoreService,
    client_id: &str,
    target: Target,
) -> Result<Option<Stored>, BackendError> {
    let value = core.get_state(StateStore::Sessions, client_id).await?;
    let Some(mut stored) = value.as_deref().and_then(Stored::decode) else { return Ok(None) };
    for p in &mut stored.positions {
        let tp = TopicPartition::new(p.topic.clone(), p.partition);
        p.committed = match target {
            Target::Latest => core.end_offset(&tp).await?,
            Target::Earliest => {
                let first = core.fetch(&tp, 0, 1).await?;
                first.records.first().map_or(first.next_offset, |r| r.offset)
            }
            Target::Time { time_ms } => backend::offset_for_time(core, &tp, time_ms).await?,
        };
        p.acked.clear();
    }
    stored.inflight.retain(|i| i.released);
    core.put_state(StateStore::Sessions, client_id, Some(stored.encode())).await?;
    Ok(Some(stored))
}

/// A reset forwarded to the gateway a client is connected to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    #[serde(rename = "clientId")]
    pub client_id: String,
    #[serde(flatten)]
    pub target: Target,
    /// The gateway that wrote the command.
    #[serde(rename = "gatewayId")]
    pub gateway_id: String,
}

/// Write a reset command to the control topic (resolves once durable).
pub async fn forward(core: &dyn CoreService, control_topic: &str, command: &Command) -> Result<(), BackendError> {
    let record = CoreRecord {
        key: Some(Bytes::copy_from_slice(command.client_id.as_bytes())),
        headers: vec![(GATEWAY_HEADER.to_string(), Bytes::copy_from_slice(command.gateway_id.as_bytes()))],
        value: Bytes::from(serde_json::to_vec(command).unwrap_or_default()),
        timestamp_ms: crate::now_ms(),
    };
    core.append(control_topic, record).await.map(|_| ())
}

/// The command in `r` if another gateway wrote it into `control_topic`.
pub fn foreign_command(r: &Record, control_topic: &str, gateway_id: &str) -> Option<Command> {
    if &*r.tp.topic != control_topic {
        return None;
    }
    let writer = std::str::from_utf8(r.record.header(GATEWAY_HEADER)?).ok()?;
    let c = serde_json::from_slice::<Command>(&r.record.value).ok()?;
    (!writer.is_empty() && writer == c.gateway_id && c.gateway_id != gateway_id).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, writer: Option<&str>, c: &Command) -> Record {
        let mut headers = Vec::new();
        if let Some(w) = writer {
            headers.push((GATEWAY_HEADER.to_string(), Bytes::copy_from_slice(w.as_bytes())));
        }
        let record =
            CoreRecord { key: None, headers, value: Bytes::from(serde_json::to_vec(c).unwrap()), timestamp_ms: 0 };
        Record { tp: TopicPartition::new(topic, 0), offset: 0, record }
    }

    #[test]
    fn commands_count_only_from_another_gateway_in_the_control_topic() {
        let c = Command { client_id: "dev".into(), target: Target::Time { time_ms: 5 }, gateway_id: "gw-a".into() };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json, serde_json::json!({"clientId": "dev", "to": "time", "time_ms": 5, "gatewayId": "gw-a"}));
        assert_eq!(foreign_command(&record("ctl", Some("gw-a"), &c), "ctl", "gw-b"), Some(c.clone()));
        // Our own, another topic, no marker, a marker that disagrees: ignored.
        assert_eq!(foreign_command(&record("ctl", Some("gw-a"), &c), "ctl", "gw-a"), None);
        assert_eq!(foreign_command(&record("other", Some("gw-a"), &c), "ctl", "gw-b"), None);
        assert_eq!(foreign_command(&record("ctl", None, &c), "ctl", "gw-b"), None);
        assert_eq!(foreign_command(&record("ctl", Some("gw-c"), &c), "ctl", "gw-b"), None);
    }
}
