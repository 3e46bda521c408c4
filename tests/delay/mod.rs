//! Delayed-message checks (SPEC §9), written once and run on every core service:
//! `tests/delayed.rs` (embedded), `tests/kafka.rs` and `tests/rocketmq.rs` (module
//! `delay_checks`), with the runner macros of `tests/hostile` and its [`Core`].

#![allow(dead_code, unused_imports, unused_macros)]

/// Calls `$m!(delay; check, ...)` with every delayed-message check.
macro_rules! for_each_delay_check {
    ($m:ident) => {
        $m!(
            delay;
            a_delayed_message_arrives_no_earlier_than_due_and_about_on_time,
            overdue_messages_are_delivered_in_due_order,
        );
    };
}

pub mod basic;
pub mod order;

pub use crate::hostile::Core;
pub use basic::*;
pub use order::*;

use lmq_gateway::gateway::Gateway;
use std::time::{Duration, Instant};

/// `extra` (a gateway's configuration after `core:`) with a reserved prefix of its own, so the
/// check's delay levels, lease and checkpoints on a shared broker are its alone (otherwise the
/// gateways of checks running at once would take turns holding one forwarding lease).
pub fn isolated(extra: &str) -> String {
    format!("{extra}topics:\n  reserved_prefix: {}-\n", crate::hostile::unique("d").to_lowercase())
}

/// Wait until `gw` moves delayed messages (it holds the forwarding lease).
pub async fn wait_forwarding(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.ctx.metrics.delay.holder.get() != 1 {
        assert!(Instant::now() < deadline, "the gateway never took up forwarding delayed messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
