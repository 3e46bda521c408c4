//! The delayed-message checks of `tests/delay` on the embedded core service.

mod common;
#[macro_use]
mod hostile;
#[macro_use]
mod delay;

for_each_delay_check!(on_embedded);
