//! Sessions belong to identities (SPEC §8), on the embedded core service: the checks of
//! `tests/hostile/sessions.rs` (`tests/kafka.rs` and `tests/rocketmq.rs` run them on the
//! brokers).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;

for_each_session_check!(on_embedded);
