//! Session takeover across gateway instances (SPEC §6): every gateway reads the client
//! status events; a `connect` of a ClientId on *another* gateway, newer than the local
//! connection of that ClientId, closes the local one (MQTT 5: DISCONNECT 0x8E).

use std::sync::Arc;
use std::time::Duration;

use super::registry::{Kick, Registry};
use crate::backend::{SharedCoreService, TopicPartition};

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventBody {
    event_type: String,
    client_id: String,
    #[serde(default)]
    gateway_id: String,
    time: i64,
}

/// Follow the events topic from its end until `stop`.
pub async fn run(
    backend: SharedCoreService,
    events_topic: String,
    gateway_id: String,
    registry: Arc<Registry>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tail = backend.tail();
    let partitions = loop {
        match backend.partitions(&events_topic) {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(topic = events_topic, error = %e, "cannot read the events topic; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    for p in 0..partitions {
        let tp = TopicPartition::new(events_topic.as_str(), p);
        match backend.end_offset(&tp).await {
            Ok(end) => tail.assign(tp, end),
            Err(e) => tracing::warn!(topic = events_topic, error = %e, "cannot find the end of the events topic"),
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
                    let Ok(ev) = serde_json::from_slice::<EventBody>(&r.record.value) else { continue };
                    if ev.event_type == "connect"
                        && ev.gateway_id != gateway_id
                        && registry.kick_if_older(&ev.client_id, ev.time, Kick::TakenOver { new_clean_start: false })
                    {
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
