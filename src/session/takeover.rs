//! Session takeover across gateway instances (SPEC §6): every gateway reads the client
//! status events; a `connect` of a ClientId on *another* gateway, newer than the local
//! connection of that ClientId, closes the local one (MQTT 5: DISCONNECT 0x8E). The same
//! follower reads the control topic: a session reset forwarded by another gateway for a client
//! connected here disconnects it and applies the reset once its session is saved
//! (`session::reset`).
//!
//! Only events that gateways wrote count (SPEC §8): the record must come from the events
//! topic and carry the [`GATEWAY_HEADER`] marker naming the same gateway as its body. MQTT
//! clients cannot write to the events topic (reserved namespace) and cannot produce that
//! header on any topic (`router::mapping` writes a fixed header set), so no device can kick
//! another one. Applications with direct write access to the core service can; that is what
//! the core service's own ACLs are for.

use std::sync::Arc;
use std::time::Duration;

use super::registry::{Kick, Registry};
use super::reset;
use crate::backend::{Record, SharedCoreService, TopicPartition};
use crate::events::GATEWAY_HEADER;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EventBody {
    pub(crate) event_type: String,
    pub(crate) client_id: String,
    #[serde(default)]
    pub(crate) gateway_id: String,
    pub(crate) time: i64,
}

/// The `connect` event in `r`, if it is one that another gateway wrote into `events_topic`.
pub(crate) fn foreign_connect(r: &Record, events_topic: &str, gateway_id: &str) -> Option<EventBody> {
    if &*r.tp.topic != events_topic {
        return None;
    }
    let writer = std::str::from_utf8(r.record.header(GATEWAY_HEADER)?).ok()?;
    let ev = serde_json::from_slice::<EventBody>(&r.record.value).ok()?;
    let genuine = !writer.is_empty() && writer == ev.gateway_id;
    (genuine && ev.event_type == "connect" && ev.gateway_id != gateway_id).then_some(ev)
}

/// Longest a forwarded reset waits for the client to end and save its session.
const KICK_WAIT: Duration = Duration::from_secs(10);

/// Follow the events topic and the control topic from their ends until `stop`.
pub async fn run(
    backend: SharedCoreService,
    (events_topic, control_topic): (String, String),
    gateway_id: String,
    registry: Arc<Registry>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tail = backend.tail();
    for topic in [&events_topic, &control_topic] {
        let partitions = loop {
            let known = match backend.ensure_topic(topic, 1).await {
                Ok(()) => backend.partitions(topic),
                Err(e) => Err(e),
            };
            match known {
                Ok(p) => break p,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "cannot read the topic; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        for p in 0..partitions {
            let tp = TopicPartition::new(topic.as_str(), p);
            match backend.end_offset(&tp).await {
                Ok(end) => tail.assign(tp, end),
                Err(e) => tracing::warn!(topic, error = %e, "cannot find the end of the topic"),
            }
        }
    }
    loop {
        let batch = tokio::select! {
            b = tail.poll() => b,
            _ = stop.cancelled() => return,
        };
        match batch {
            Ok(records) => {
                for r in records {
                    if let Some(command) = reset::foreign_command(&r, &control_topic, &gateway_id) {
                        if registry.get(&command.client_id).is_some() {
                            tokio::spawn(apply_forwarded(backend.clone(), registry.clone(), command));
                        }
                        continue;
                    }
                    let Some(ev) = foreign_connect(&r, &events_topic, &gateway_id) else { continue };
                    if registry.kick_if_older(&ev.client_id, ev.time, Kick::TakenOver { new_clean_start: false }) {
                        tracing::info!(
                            client_id = ev.client_id,
                            by = ev.gateway_id,
                            "session taken over by another gateway"
                        );
                    }
                }
            }
            Err(crate::backend::BackendError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the events topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A reset another gateway forwarded for a client connected here: disconnect it, wait for its
/// session to be saved, reset the saved session.
async fn apply_forwarded(backend: SharedCoreService, registry: Arc<Registry>, command: reset::Command) {
    if !registry.kick_and_wait(&command.client_id, Kick::Administrative, KICK_WAIT).await {
        return;
    }
    match reset::reset_stored(backend.as_ref(), &command.client_id, command.target).await {
        Ok(_) => tracing::info!(client_id = command.client_id, by = command.gateway_id, "session reset"),
        Err(e) => tracing::warn!(client_id = command.client_id, error = %e, "forwarded session reset failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CoreRecord;
    use crate::events::{ClientEvent, EventType};

    fn event(gateway_id: &str) -> ClientEvent {
        ClientEvent {
            event_type: EventType::Connect,
            client_id: "victim".into(),
            channel_id: "c1".into(),
            client_ip: "127.0.0.1".into(),
            time: 1,
            gateway_id: gateway_id.into(),
            username: None,
            reason: None,
        }
    }

    fn record(topic: &str, record: CoreRecord) -> Record {
        Record { tp: TopicPartition::new(topic, 0), offset: 0, record }
    }

    #[test]
    fn only_marked_events_of_other_gateways_in_the_events_topic_count() {
        let genuine = record("events", event("gw-b").to_record());
        assert_eq!(foreign_connect(&genuine, "events", "gw-a").map(|e| e.client_id), Some("victim".into()));
        // Our own connect, or one read from another topic: ignored.
        assert!(foreign_connect(&genuine, "events", "gw-b").is_none());
        assert!(foreign_connect(&record("sensors", event("gw-b").to_record()), "events", "gw-a").is_none());
        // The same body without the marker (a device or application writing JSON): ignored.
        let mut unmarked = event("gw-b").to_record();
        unmarked.headers.retain(|(k, _)| k != GATEWAY_HEADER);
        assert!(foreign_connect(&record("events", unmarked), "events", "gw-a").is_none());
        // A marker that disagrees with the body: ignored.
        let mut mismatched = event("gw-b").to_record();
        mismatched.headers.retain(|(k, _)| k != GATEWAY_HEADER);
        mismatched.headers.push((GATEWAY_HEADER.into(), bytes::Bytes::from_static(b"gw-c")));
        assert!(foreign_connect(&record("events", mismatched), "events", "gw-a").is_none());
    }
}
