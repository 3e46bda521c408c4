//! End of a connection: tell the client why, save or drop the session, publish the will,
//! write events, leave the router and the registry.

use super::*;
use crate::session::machine::{will_delay, Ending};

/// How a connection ended.
#[derive(Debug, Clone)]
pub(super) enum End {
    /// DISCONNECT from the client; `with_will` for MQTT 5 reason 0x04.
    ClientDisconnect {
        with_will: bool,
    },
    /// Socket closed or failed without DISCONNECT.
    Dropped(&'static str),
    /// We close it; MQTT 5 clients get a DISCONNECT with this reason first.
    Server(ReasonCode, &'static str),
    /// The client left its output backed up longer than `mqtt.write_stall_timeout_secs`
    /// (MQTT 5: DISCONNECT 0x97 if it can still be written).
    SlowReader,
    Kicked(Kick),
}

impl End {
    /// `reason` label of `lmq_connections_closed_total` (a fixed set of names).
    pub(super) fn metric_reason(&self) -> &'static str {
        match self {
            End::ClientDisconnect { .. } => "client_disconnect",
            End::Dropped(_) => "connection_lost",
            End::Server(code, _) => match *code {
                ReasonCode::KEEP_ALIVE_TIMEOUT => "keepalive_timeout",
                ReasonCode::NOT_AUTHORIZED => "not_authorized",
                ReasonCode::SERVER_BUSY => "core_unavailable",
                ReasonCode::PACKET_TOO_LARGE | ReasonCode::TOPIC_NAME_INVALID | ReasonCode::QUOTA_EXCEEDED => "limit",
                _ => "protocol_error",
            },
            End::SlowReader => "slow_reader",
            End::Kicked(Kick::TakenOver { .. }) => "taken_over",
            End::Kicked(Kick::Shutdown) => "shutdown",
            End::Kicked(Kick::Administrative) => "kicked",
        }
    }
}

impl Conn {
    /// Write a status event. Events of one connection are written in order: each waits for
    /// the previous one, without holding up the connection.
    pub(super) fn emit(&mut self, event_type: EventType, reason: Option<String>) {
        let ev = ClientEvent {
            event_type,
            client_id: self.client_id.clone(),
            channel_id: self.channel_id.clone(),
            client_ip: self.info.peer.ip().to_string(),
            time: now_ms(),
            gateway_id: self.ctx.gateway_id.clone(),
            username: self.username.clone(),
            reason,
        };
        let ctx = self.ctx.clone();
        let previous = self.last_event.take();
        // The task is not joined: it frees itself once the event is written, and what the
        // connection keeps until its next event is the small signal that it was (an idle
        // connection does not hold its connect event's task for its life).
        let (written_tx, written_rx) = tokio::sync::oneshot::channel();
        self.last_event = Some(written_rx);
        tokio::spawn(async move {
            if let Some(p) = previous {
                let _ = p.await;
            }
            let written = ctx.backend.emit_event(ev).await;
            ctx.metrics.event_written(event_type, written.is_ok());
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot write client status event");
            }
            let _ = written_tx.send(());
        });
    }

    /// After the loop: tell the client why, save or drop the session, publish the will,
    /// write events, leave the router and registry.
    pub(super) async fn finish<W: AsyncWrite + Unpin>(mut self, end: End, writer: &mut W) {
        let (reason, ending, event_reason) = match &end {
            End::ClientDisconnect { with_will } => {
                (None, Ending::Disconnect { with_will: *with_will }, "client disconnect".to_string())
            }
            End::Dropped(why) => (None, Ending::Lost, why.to_string()),
            End::Server(code, why) => (Some(*code), Ending::Lost, why.to_string()),
            End::SlowReader => (Some(ReasonCode::QUOTA_EXCEEDED), Ending::Lost, "slow reader".to_string()),
            End::Kicked(Kick::TakenOver { new_clean_start }) => (
                Some(ReasonCode::SESSION_TAKEN_OVER),
                Ending::TakenOver { new_clean_start: *new_clean_start },
                "session taken over".to_string(),
            ),
            End::Kicked(Kick::Shutdown) => {
                (Some(ReasonCode::SERVER_SHUTTING_DOWN), Ending::Lost, "server shutting down".to_string())
            }
            End::Kicked(Kick::Administrative) => {
                (Some(ReasonCode::ADMINISTRATIVE_ACTION), Ending::Lost, "kicked".to_string())
            }
        };
        if matches!(end, End::ClientDisconnect { .. }) {
            self.emit(EventType::Disconnect, None);
        }
        if let (Some(code), Protocol::V5) = (reason, self.protocol) {
            // The reason in words [MQTT-3.14.2.2.3]; a DISCONNECT may carry it whatever the
            // client's Request Problem Information.
            let properties = DisconnectProperties { reason_string: Some(event_reason.clone()), ..Default::default() };
            let d = Disconnect { code, properties };
            self.send(&Packet::Disconnect(d));
        }
        let out = self.out.take();
        if !out.is_empty() {
            self.ctx.metrics.bytes_out().inc_by(out.len() as u64);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
            })
            .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;

        // Leave the router first so no more deliveries queue up.
        let filters: Vec<String> = self.session.state.subscriptions.iter().map(|s| s.filter.clone()).collect();
        self.ctx.router.unregister(&self.slot, &filters);
        // Messages still pending were never sent; their positions stay uncommitted, so a
        // persistent session gets them on reconnect.
        // The save in flight lands first, so the final one is not overwritten by it.
        let in_flight = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
        let _ = tokio::time::timeout(in_flight, self.finish_persist()).await;
        let save = if self.session.expiry > 0 {
            self.save_session(Some(Stored::from_state(&self.session.state, self.session.expiry, Some(now_ms()))))
        } else if self.stored {
            self.save_session(None)
        } else {
            async { Ok(()) }.boxed()
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs), save)
            .await
            .unwrap_or(Err(BackendError::Timeout(Duration::from_secs(0))))
        {
            tracing::warn!(client_id = %self.client_id, error = %e, "cannot save session at disconnect");
        }
        if let Some(will) = self.session.will.take() {
            if let Some(delay) = will_delay(ending, &will, self.session.expiry) {
                self.schedule_will(will, delay);
            }
        }
        self.emit(EventType::Tcpclean, Some(event_reason));
        // Written before we report done: a takeover's `connect` follows our `tcpclean`, and a
        // shutdown does not close the core service under it.
        if let Some(last) = self.last_event.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), last).await;
        }
        let _ = self.registration.done.send(true);
        self.ctx.registry.release(&self.client_id, self.registration.conn_id);
        self.gauges.report(&self.ctx.metrics, [0, 0, 0]);
        tracing::debug!(client_id = %self.client_id, ?end, "client disconnected");
    }

    /// Publish the will after `delay` seconds (cancelled if the session resumes meanwhile).
    pub(super) fn schedule_will(&self, will: LastWill, delay: u32) {
        let ctx = self.ctx.clone();
        let client_id = self.client_id.clone();
        let message = Arc::new(Message::from_will(&will, client_id.as_str().into(), now_ms()));
        // Delayed wills wait in memory: bounded per identity, the rest are published at once.
        let max = ctx.config.limits.max_delayed_wills_per_identity;
        let cancel = (delay > 0).then(|| ctx.registry.park_will(&client_id, &self.identity.owner(), max)).flatten();
        if delay > 0 && cancel.is_none() {
            ctx.limits.count(crate::labels::Refusal::DelayedWillsPerIdentity);
        }
        tokio::spawn(async move {
            if let Some(cancel) = cancel {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(u64::from(delay))) => {}
                    _ = cancel => return,
                }
                ctx.registry.will_done(&client_id);
            }
            let Some(core) = ctx.router.topics().core_topic(topic::parent(&message.topic)) else {
                tracing::warn!(client_id, topic = %message.topic, "will topic's parent is not declared; will dropped");
                return;
            };
            if let Err(e) = ctx.router.ensure_for_publish(&core, &message.topic).await {
                tracing::warn!(client_id, error = %e, "cannot publish will");
                return;
            }
            let stored = match crate::ingest::store(
                &ctx,
                &core.name,
                crate::ingest::with_timestamp(message, now_ms()),
                None,
                None,
            )
            .await
            {
                Ok((ack, _)) => ack.await,
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                tracing::warn!(client_id, error = %e, "cannot publish will");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_the_ones_counted_from_the_start() {
        let mut ends = vec![
            End::ClientDisconnect { with_will: false },
            End::Dropped("eof"),
            End::SlowReader,
            End::Kicked(Kick::TakenOver { new_clean_start: true }),
            End::Kicked(Kick::Shutdown),
            End::Kicked(Kick::Administrative),
        ];
        ends.extend((0..=u8::MAX).map(|c| End::Server(ReasonCode(c), "")));
        for end in &ends {
            let reason = end.metric_reason();
            assert!(crate::metrics::CLOSE_REASONS.contains(&reason), "{reason} missing from metrics::CLOSE_REASONS");
        }
    }
}
