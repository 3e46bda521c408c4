//! Delayed-message checks (SPEC §9), written once and run on every core service:
//! `tests/delayed.rs` (embedded), `tests/kafka.rs` and `tests/rocketmq.rs` (module
//! `delay_checks`), with the runner macros of `tests/hostile` and its [`Core`].

#![allow(dead_code, unused_imports, unused_macros)]

/// Calls `$m!(delay; check, ...)` with every delayed-message check.
macro_rules! for_each_delay_check {
    ($m:ident) => {
        $m!(delay; a_delayed_message_arrives_no_earlier_than_due_and_about_on_time,);
    };
}

pub mod basic;

pub use crate::hostile::Core;
pub use basic::*;

use lmq_gateway::gateway::Gateway;
use std::time::{Duration, Instant};

/// Wait until `gw` moves delayed messages (it holds the forwarding lease).
pub async fn wait_forwarding(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.ctx.metrics.delay.holder.get() != 1 {
        assert!(Instant::now() < deadline, "the gateway never took up forwarding delayed messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
