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
