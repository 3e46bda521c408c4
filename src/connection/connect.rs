//! CONNECT: validation, takeover of an existing session, restoring a stored session, CONNACK.

use super::*;

/// Records read per fetch when a restored session reads back its in-flight messages.
const RESTORE_FETCH_WINDOW: usize = 500;

impl Conn {
    /// Validate CONNECT, take over an existing session, restore state, send CONNACK.
    pub(super) async fn accept<W: AsyncWrite + Unpin>(
        ctx: Arc<Context>,
        connect: Connect,
        info: ConnInfo,
        conn_id: u64,
        writer: &mut W,
    ) -> Option<Conn> {
        let protocol = connect.protocol;
        let refuse = |code: ReasonCode| {
            ctx.metrics.connect_result(code);
            Packet::ConnAck(ConnAck { code, ..ConnAck::default() })
        };
        let mqtt = &ctx.config.mqtt;

        // ClientId: assign one when empty and allowed [MQTT-3.1.3-6/7/8].
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !connect.clean_start && protocol != Protocol::V5 {
                let _ = write_now(writer, &refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID), protocol).await;
                return None;
            }
            let id = format!("auto-{}-{conn_id}", ctx.gateway_id);
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        let lmq_names = ctx.config.naming == crate::config::Naming::Lmq;
        if ctx.limits.check_client_id(&client_id).is_err() || (lmq_names && client_id.starts_with('$')) {
            let _ = write_now(writer, &refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID), protocol).await;
            return None;
        }
        if let Some(w) = &connect.will {
            if topic::validate_name(&w.topic).is_err() || ctx.limits.check_topic(&w.topic).is_err() {
                let _ = write_now(writer, &refuse(ReasonCode::TOPIC_NAME_INVALID), protocol).await;
                return None;
            }
        }

        // Who is it (SPEC §4)? Decided before anything else happens to an existing session.
        let request = crate::auth::AuthRequest {
            client_id: &client_id,
            username: connect.username.as_deref(),
            password: connect.password.as_deref(),
            tls_client_cn: info.tls_cn.as_deref(),
        };
        let identity = match ctx.auth.authenticate(&request).await {
            Ok(identity) => identity,
            Err(f) => {
                tracing::debug!(client_id, peer = %info.peer, mode = f.mode.as_str(), reason = f.reason, "authentication failed");
                ctx.metrics.auth_failure(f.mode.as_str(), f.reason);
                let _ = write_now(writer, &refuse(f.reason_code()), protocol).await;
                return None;
            }
        };
        if let Some(w) = &connect.will {
            if ctx.router.topics().resolve(topic::parent(&w.topic)) == Err(Unmapped::Reserved) {
                let r = ctx.limits.refuse_reserved();
                let _ = write_now(writer, &refuse(r.reason_code()), protocol).await;
                return None;
            }
            if identity.check_publish(&w.topic).is_err() {
                let _ = write_now(writer, &refuse(ReasonCode::NOT_AUTHORIZED), protocol).await;
                return None;
            }
        }

        // Keepalive: MQTT 5 clients asking for none or too long get Server Keep Alive.
        let mut server_keep_alive = None;
        let ka =
            if protocol == Protocol::V5 && (connect.keep_alive == 0 || connect.keep_alive > mqtt.keepalive_max_secs) {
                server_keep_alive = Some(mqtt.keepalive_max_secs);
                mqtt.keepalive_max_secs
            } else {
                connect.keep_alive.min(mqtt.keepalive_max_secs.max(1))
            };
        let requested_expiry = match protocol {
            Protocol::V5 => connect.properties.session_expiry_interval.unwrap_or(0),
            _ if connect.clean_start => 0,
            _ => u32::MAX,
        };
        let session_expiry = requested_expiry.min(mqtt.session_expiry_max_secs);

        // Takeover: the old connection saves its session before we load it.
        let new_clean_start = connect.clean_start;
        let registration =
            ctx.registry.take(&client_id, conn_id, Kick::TakenOver { new_clean_start }, Duration::from_secs(10)).await;

        // Session: load the stored one unless clean start.
        let backend = &ctx.backend;
        let existing = match tokio::time::timeout(
            Duration::from_secs(mqtt.backend_timeout_secs),
            backend.get_state(StateStore::Sessions, &client_id),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(client_id, error = %e, "cannot load session");
                let _ = write_now(writer, &refuse(ReasonCode::SERVER_UNAVAILABLE), protocol).await;
                ctx.registry.release(&client_id, conn_id);
                return None;
            }
            Err(_) => {
                let _ = write_now(writer, &refuse(ReasonCode::SERVER_UNAVAILABLE), protocol).await;
                ctx.registry.release(&client_id, conn_id);
                return None;
            }
        };
        let had_stored = existing.is_some();
        let owner = identity.owner();
        let owners = &ctx.registry.owners;
        let stored = if connect.clean_start {
            // A clean start discards any stored session [MQTT-3.1.2-4].
            if had_stored {
                if let Some(o) = existing.as_deref().and_then(Stored::decode).and_then(|s| s.owner) {
                    owners.remove(&o);
                }
                let _ = backend.put_state(StateStore::Sessions, &client_id, None).await;
            }
            None
        } else {
            match existing.and_then(|b| Stored::decode(&b)).filter(|s| !s.expired(now_ms())) {
                // A session belongs to the identity that created it (SPEC §8): another one
                // using the same ClientId starts afresh and never sees its subscriptions or
                // messages. The old session is removed, as a clean start would.
                Some(s) if s.owner.as_deref().is_some_and(|o| o != owner) => {
                    tracing::info!(
                        client_id,
                        mode = identity.mode.as_str(),
                        "stored session belongs to another identity: a fresh session is started"
                    );
                    if let Some(o) = &s.owner {
                        owners.remove(o);
                    }
                    let _ = backend.put_state(StateStore::Sessions, &client_id, None).await;
                    None
                }
                s => s,
            }
        };
        let session_present = stored.is_some();
        // A new persistent session: bounded per identity (SPEC §8).
        if !session_present
            && session_expiry > 0
            && !owners.try_add(&owner, ctx.config.limits.max_sessions_per_identity)
        {
            let r = ctx.limits.count(crate::labels::Refusal::SessionsPerIdentity);
            let _ = write_now(writer, &refuse(r.reason_code()), protocol).await;
            ctx.registry.release(&client_id, conn_id);
            return None;
        }
        let (mut state, inflight) = match stored {
            Some(s) => s.into_state(),
            None => (SessionState::new(client_id.clone()), Vec::new()),
        };
        state.owner = Some(owner);
        state.p2p = ctx.config.naming == crate::config::Naming::Lmq;

        let (slot, rx) = ctx.router.register(client_id.clone().into(), mqtt.queue_capacity);
        let window = match protocol {
            Protocol::V5 => usize::from(connect.properties.receive_maximum.unwrap_or(u16::MAX).min(mqtt.max_inflight)),
            _ => usize::from(mqtt.max_inflight),
        };
        let mut conn = Conn {
            protocol,
            client_id: client_id.clone(),
            username: connect.username.clone(),
            info,
            revocations: matches!(
                identity.mode,
                crate::labels::AuthMode::Token | crate::labels::AuthMode::DeviceCredential
            )
            .then(|| ctx.auth.revocations()),
            identity,
            expiry_notified: Vec::new(),
            channel_id: format!("{}-{conn_id}", ctx.gateway_id),
            // Keepalive 0 (MQTT 3.1/3.1.1) means no keepalive, but not a connection held
            // forever by a silent client: it gets the configured idle limit instead.
            keep_alive: match ka {
                0 => Duration::from_secs(mqtt.idle_timeout_secs_when_keepalive_0),
                ka => Duration::from_millis(u64::from(ka) * 1500),
            },
            session: Session::new(
                state,
                protocol,
                Limits {
                    window,
                    client_max_packet: connect.properties.maximum_packet_size.map(|v| v as usize),
                    topic_alias_max: connect.properties.topic_alias_maximum.unwrap_or(0).min(mqtt.topic_alias_max),
                    client_alias_max: mqtt.topic_alias_max,
                    receive_maximum: mqtt.receive_maximum,
                },
            )
            .with_lifetime(session_expiry, connect.will.clone()),
            slot,
            rx,
            registration,
            out: Output::new(mqtt.max_output_buffer_bytes),
            stored: session_present,
            last_event: None,
            persist: None,
            gauges: Default::default(),
            positions_at: Instant::now(),
            positions_stale: false,
            offline: offline::OfflinePull::new(Duration::from_millis(mqtt.offline_pull_window_ms)),
            waiting: Waiting::default(),
            ctx: ctx.clone(),
        };

        // Re-register restored subscriptions with the router and catch up from stored positions.
        if let Err(code) = conn.restore(inflight).await {
            let _ = write_now(writer, &refuse(code), protocol).await;
            conn.ctx.router.unregister(&conn.slot, &[]);
            conn.ctx.registry.release(&client_id, conn_id);
            return None;
        }

        if session_expiry > 0 {
            // Offline P2P messages: a persistent session reads every known core topic.
            let router = conn.ctx.router.clone();
            for (tp, live) in router.positions(&router.assigned_topics()) {
                conn.session.state.cursor(&tp, live);
            }
        }

        let mut props = ConnAckProperties::default();
        if protocol == Protocol::V5 {
            props.receive_maximum = Some(mqtt.receive_maximum);
            props.maximum_packet_size = u32::try_from(ctx.limits.max_packet_size()).ok();
            props.topic_alias_maximum = Some(mqtt.topic_alias_max);
            props.retain_available = (!mqtt.retain_available).then_some(0);
            props.assigned_client_identifier = assigned;
            props.server_keep_alive = server_keep_alive;
            if requested_expiry != session_expiry {
                props.session_expiry_interval = Some(session_expiry);
            }
        }
        let ack = Packet::ConnAck(ConnAck { session_present, code: ReasonCode::SUCCESS, properties: props });
        ctx.metrics.connect_result(ReasonCode::SUCCESS);
        conn.emit(EventType::Connect, None);
        if conn.out.send(&ack, protocol).is_err() {
            return None;
        }
        // Re-sent in-flight messages go out right after CONNACK.
        conn.resend_inflight();
        if session_expiry > 0 {
            conn.session.changed = true;
            conn.session.save_soon = true;
        }
        ctx.registry.describe(
            conn_id,
            crate::session::registry::ClientInfo {
                client_id: client_id.clone(),
                channel_id: conn.channel_id.clone(),
                client_ip: conn.info.peer.ip().to_string(),
                listener: conn.info.listener.to_string(),
                transport: conn.info.transport.as_str(),
                protocol: match protocol {
                    Protocol::V31 => "3.1",
                    Protocol::V311 => "3.1.1",
                    Protocol::V5 => "5.0",
                },
                username: conn.username.clone(),
                auth_mode: conn.identity.mode.as_str(),
                keep_alive_secs: u64::from(ka),
                session_expiry_secs: session_expiry,
                connected_ms: now_ms(),
            },
        );
        let info = &conn.info;
        tracing::debug!(
            client_id,
            peer = %info.peer,
            listener = %info.listener,
            transport = info.transport.as_str(),
            tls_cn = ?info.tls_cn,
            ?protocol,
            session_present,
            "client connected"
        );
        Some(conn)
    }

    /// Subscriptions and positions of a restored session go back to the router. Each
    /// subscription is checked against the rights the client has now; one they no longer
    /// cover is dropped (and with it the in-flight messages it brought).
    pub(super) async fn restore(&mut self, inflight: Vec<StoredInflight>) -> Result<(), ReasonCode> {
        let router = self.ctx.router.clone();
        self.drop_forbidden_subscriptions("restored");
        // Positions in reserved topics (stored before the reserved namespace existed) are
        // dropped: nothing is read back from them for a client.
        let before = self.session.state.cursors.len();
        self.session.state.cursors.retain(|tp, _| !router.topics().is_reserved(&tp.topic));
        self.session.changed |= self.session.state.cursors.len() != before;
        // Every stored position is marked lagging before the subscriptions go back to the
        // router: the router skips this session there until it has read back what it
        // missed (or the client pulled it), so a record routed meanwhile cannot overtake the
        // backlog — nor be pushed while an offline pull request is awaited.
        for (tp, c) in &self.session.state.cursors {
            self.slot.mark_lagging(tp.clone(), c.committed());
        }
        // Whether the core service holds records after a stored position (an offline backlog
        // the client may pull). Asked before the subscriptions go back to the router, so no
        // live delivery can arrive while this waits. An end that cannot be read in time counts
        // as a backlog. Without one, nothing waits for a pull request.
        let behind = self.offline.deciding() && {
            let timeout = Duration::from_secs(self.ctx.config.mqtt.backend_timeout_secs);
            let stored: Vec<(TopicPartition, u64)> =
                self.session.state.cursors.iter().map(|(tp, c)| (tp.clone(), c.committed())).collect();
            let backend = self.ctx.backend.clone();
            let ends = futures::future::join_all(
                stored.iter().map(|(tp, _)| tokio::time::timeout(timeout, backend.end_offset(tp))),
            )
            .await;
            stored.iter().zip(&ends).any(|((_, from), end)| !matches!(end, Ok(Ok(e)) if e <= from))
        };
        let filters: Vec<(String, QoS)> =
            self.session.state.subscriptions.iter().map(|s| (s.filter.clone(), s.options.qos)).collect();
        for (filter, qos) in filters {
            // Filters onto reserved or undeclared topics were dropped above.
            let positions =
                router.subscribe(&self.slot, &filter, qos).await.map_err(|_| ReasonCode::SERVER_UNAVAILABLE)?;
            for (tp, live) in positions {
                self.session.state.cursor(&tp, live);
            }
        }
        // In-flight messages: fetch their bodies back from the log, a window of offsets per
        // read (one round trip for a window of consecutive messages, not one per message).
        let inflight: Vec<StoredInflight> =
            inflight.into_iter().filter(|inf| !router.topics().is_reserved(&inf.topic)).collect();
        let mut wanted: HashMap<TopicPartition, Vec<u64>> = HashMap::new();
        for inf in inflight.iter().filter(|inf| !inf.released) {
            let o = inf.origin();
            wanted.entry(o.tp).or_default().push(o.offset);
        }
        let mut bodies: HashMap<(TopicPartition, u64), Arc<Message>> = HashMap::new();
        for (tp, mut offsets) in wanted {
            offsets.sort_unstable();
            let mut i = 0;
            while let Some(&from) = offsets.get(i) {
                let fetched = self
                    .ctx
                    .backend
                    .fetch(&tp, from, RESTORE_FETCH_WINDOW)
                    .await
                    .map_err(|_| ReasonCode::SERVER_UNAVAILABLE)?;
                for r in &fetched.records {
                    if offsets.binary_search(&r.offset).is_ok() {
                        if let Some(m) = record_message(&self.ctx, &r.tp, &r.record) {
                            bodies.insert((tp.clone(), r.offset), m);
                        }
                    }
                }
                // Next: the first wanted offset the read did not reach (gone by retention
                // when the read skipped past it).
                let reached = fetched.next_offset.max(from + 1);
                i = offsets.partition_point(|&o| o < reached);
            }
        }
        let identity = &self.identity;
        self.session.restore_inflight(inflight, bodies, |topic| identity.check_subscribe(topic).is_ok());
        // Every cursor reads back what the session missed while away.
        let cursors: Vec<(TopicPartition, u64)> =
            self.session.state.cursors.iter().map(|(tp, c)| (tp.clone(), c.committed())).collect();
        // Offline pull: held back while the client may still ask for it instead (only when
        // there is a backlog, see above).
        if behind && !cursors.is_empty() {
            let tps: Vec<TopicPartition> = cursors.iter().map(|(tp, _)| tp.clone()).collect();
            self.offline.hold(router.positions_of(&tps));
        }
        for (tp, from) in cursors {
            self.slot.mark_lagging(tp, from);
        }
        Ok(())
    }

    /// Remove every subscription the current identity may no longer make (restored from a
    /// stored session, or after a token upload narrowed the rights) or that no longer maps
    /// onto a readable core topic (undeclared parent, reserved namespace), from the session
    /// and the router. Returns how many were removed.
    pub(super) fn drop_forbidden_subscriptions(&mut self, why: &'static str) -> usize {
        let forbidden: Vec<String> = self
            .session
            .state
            .subscriptions
            .iter()
            .filter(|s| self.identity.check_subscribe(&s.filter).is_err() || !self.reachable(&s.filter))
            .map(|s| s.filter.clone())
            .collect();
        for filter in &forbidden {
            self.session.state.unsubscribe(filter);
            self.ctx.router.unsubscribe(&self.slot, filter);
            tracing::info!(client_id = self.client_id, filter, why, "subscription no longer allowed: removed");
        }
        if !forbidden.is_empty() {
            self.session.changed = true;
            self.session.save_soon = true;
        }
        forbidden.len()
    }

    /// Whether a (possibly `$share/...`) filter maps onto core topics an MQTT client may read:
    /// a declared parent, never the reserved namespace.
    fn reachable(&self, filter: &str) -> bool {
        topic::parse_filter(filter).is_ok_and(|p| self.ctx.router.core_topics_for_filter(p.filter).is_ok())
    }

    pub(super) fn resend_inflight(&mut self) {
        for packet in self.session.resend_inflight(now_ms()) {
            self.send(&packet);
        }
    }
}
