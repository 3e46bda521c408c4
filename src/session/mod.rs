//! MQTT session: state that belongs to a ClientId rather than to one network connection.
//!
//! - [`backlog`]: backlog and delay of sessions for the metrics.
//! - [`state`]: subscriptions, read positions, messages in flight (pure data + rules).
//! - [`machine`]: the session as a state machine with no I/O — deliveries into the in-flight
//!   window, packet identifiers, topic aliases, the client's acknowledgements.
//! - [`persist`]: what of it is stored in the core service for persistent sessions.
//! - [`registry`]: connected ClientIds on this gateway (takeover) and delayed wills.
//! - [`expiry`]: removal of expired stored sessions.
//! - [`owners`]: persistent sessions per identity (bounded).
//! - [`takeover`]: closing local connections taken over on another gateway; forwarded resets.
//! - [`reset`]: moving a persistent session's positions (latest, earliest, a time).

pub mod backlog;
pub mod expiry;
pub mod machine;
pub mod owners;
pub mod persist;
pub mod registry;
pub mod reset;
pub mod state;
pub mod takeover;
