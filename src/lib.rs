//! lmq-gateway: a stateless MQTT 3.1.1 / 5.0 gateway in the style of Alibaba Cloud LMQ.
//!
//! Module map (see ARCHITECTURE.md for the data flow):
//! - [`protocol`]: MQTT codec, pure, no I/O.
//! - [`config`]: settings from `gateway.yaml`; [`config::auth`] is the `auth:` section's data,
//!   [`config::reserved`] the reserved namespace (topics no MQTT client may reach).
//! - [`context`]: the process-wide [`context::Context`] every connection shares.
//! - [`server`]: listeners; [`gateway`] wires it all up.
//! - [`transport`]: PROXY protocol, TLS, WebSocket and the browser console: one byte stream per client.
//! - [`connection`]: one task per client: read, decode, session logic, write.
//! - [`session`]: session state, persistence format, takeover registry.
//! - [`router`]: topic matching, subscription trie, MQTT ↔ record mapping, dispatch.
//! - [`backend`]: the core-service trait and its engines.
//! - [`limits`]: LMQ limits.
//! - [`labels`]: label values of the metrics several modules name (refusal reasons, auth modes).
//! - [`events`]: client status events.
//! - [`auth`]: signature / token / device credential authentication and topic ACLs.
//! - [`msgid`]: the message ID every stored message gets.
//! - [`metrics`]: every Prometheus metric (`lmq_*`), the only place their names exist.
//! - [`admin`]: admin HTTP API (axum): metrics, health, clients, tokens, credentials, messages.
//!
//! `fuzzing` (hidden) only exposes private decoders to the fuzz targets in `fuzz/`.
//!
//! Modules import one another without a cycle: each imports only from the layers below it
//! (ARCHITECTURE.md, "Layers"), which `tests/layering.rs` checks.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod config;
pub mod connection;
pub mod context;
pub mod delay;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod ingest;
pub mod labels;
pub mod limits;
pub mod metrics;
pub mod msgid;
pub mod protocol;
pub mod query;
pub mod router;
pub mod server;
pub mod session;
pub mod trace;
pub mod transport;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
