//! MQTT 3.1.1 and 5.0 codec: pure functions from bytes to packets and back, no I/O.

pub mod types;

pub use types::*;
