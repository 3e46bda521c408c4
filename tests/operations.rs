//! The operations checks of `tests/ops` (message query, trace, session reset, offline pull)
//! on the embedded core service.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;
#[macro_use]
mod ops;

for_each_ops_check!(on_embedded);
// The top-K bound is the same code on every core service: checked here only.
on_embedded!(ops; top_k_session_series_stay_within_k);
