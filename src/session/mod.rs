//! MQTT session: state that belongs to a ClientId rather than to one network connection.
//!
//! - [`state`]: subscriptions, read positions, messages in flight (pure data + rules).
//! - [`persist`]: what of it is stored in the core service for persistent sessions.
//! - [`registry`]: connected ClientIds on this gateway (takeover) and delayed wills.

pub mod persist;
pub mod registry;
pub mod state;
