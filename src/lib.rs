//! lmq-gateway: a stateless MQTT 3.1.1 / 5.0 gateway in the style of Alibaba Cloud LMQ.
//!
//! Module map (see ARCHITECTURE.md for the data flow):
//! - [`protocol`]: MQTT codec, pure.
//! - [`config`]: the `gateway.yaml` file.
//! - [`backend`]: the core-service trait and its engines.
//! - [`events`]: client status events.

pub mod backend;
pub mod config;
pub mod events;
pub mod protocol;
