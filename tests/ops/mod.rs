//! Operations checks (SPEC §10): message query, trace, session reset, offline pull, backlog
//! metrics (`backlog.rs`) — through
//! the admin API and real MQTT clients, written once and run on every core service:
//! `tests/operations.rs` (embedded), `tests/kafka.rs` and `tests/rocketmq.rs` (module
//! `ops_checks`), with the runner macros of `tests/hostile` and its [`Core`].

#![allow(dead_code, unused_imports, unused_macros)]

/// Calls `$m!(ops; check, ...)` with every operations check.
macro_rules! for_each_ops_check {
    ($m:ident) => {
        $m!(
            ops;
            messages_are_found_by_id_by_topic_and_time_and_by_key,
            a_session_reset_skips_its_backlog_or_replays_it_from_a_time,
            a_traced_qos1_message_shows_publish_stored_and_each_delivery_and_ack,
            a_traced_qos0_message_shows_where_it_was_stored,
            backlog_of_an_offline_session_is_reported_until_it_returns,
            offline_pull_delivers_at_most_30_per_request_and_only_on_request,
            offline_pull_serves_at_most_5_requests_per_second,
            offline_pull_position_moves_only_with_pubacks,
            a_client_that_does_not_pull_gets_its_backlog_pushed,
            a_client_that_publishes_first_gets_its_backlog_at_once,
            offline_pull_over_mqtt_311,
        );
    };
}

/// Calls `$m!(ops; check, ...)` with every operations check that needs two gateways on one
/// cluster (Kafka, RocketMQ).
macro_rules! for_each_cluster_ops_check {
    ($m:ident) => {
        $m!(ops; a_reset_asked_on_one_gateway_reaches_the_client_connected_to_another);
    };
}

pub mod backlog;
pub mod offline;
pub mod query;
pub mod sessions;
pub mod trace;

pub use crate::hostile::Core;
pub use backlog::*;
pub use offline::*;
pub use query::*;
pub use sessions::*;
pub use trace::*;

/// The LMQ status-events topic (reserved).
pub const EVENTS_TOPIC: &str = crate::hostile::EVENTS;
use lmq_gateway::gateway::Gateway;
use serde_json::Value;

/// The admin token of the gateways the checks start.
pub const TOKEN: &str = "ops-admin-token";

/// The `admin:` section of the gateways the checks start.
pub const ADMIN: &str = "admin:\n  enabled: true\n  bind: 127.0.0.1:0\n  token: ops-admin-token\n";

/// `METHOD path` on `gw`'s admin API with the token; status and JSON body (Null if none).
pub async fn api(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let addr = gw.admin_addr().expect("admin API enabled");
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = crate::common::http().request(method, format!("http://{addr}{path}")).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("admin request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
