//! The delayed-message checks of `tests/delay` on the embedded core service (the crash check
//! with gateway processes on one data directory).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;
#[macro_use]
mod delay;

for_each_delay_check!(on_embedded);
for_each_delay_crash_check!(on_embedded);
