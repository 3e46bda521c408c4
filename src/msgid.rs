//! Message IDs: every message stored through the gateway gets one, carried in its record
//! (header [`HEADER`]) and returned to MQTT 5 publishers as the PUBACK / PUBREC user property
//! `msgId`.
//!
//! 32 upper-case hex digits: the time in milliseconds (12), this process (8: a hash of the
//! gateway id, the process id and the start time) and a counter (12). IDs sort by time across
//! gateways (to the millisecond) and by publish order within one process; two processes clash
//! only if their 32-bit process parts are equal and their counters meet in the same millisecond.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Record header and MQTT 5 user property carrying the ID.
pub const HEADER: &str = "msgId";

static PROCESS: OnceLock<u32> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Set this process's part from the gateway id (first call wins; later ones are ignored).
pub fn init(gateway_id: &str) {
    PROCESS.get_or_init(|| process_part(gateway_id));
}

fn process_part(gateway_id: &str) -> u32 {
    // FNV-1a over the gateway id, the process id and the start time.
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut h: u32 = 0x811c_9dc5;
    let seed = format!("{gateway_id}/{}/{started}", std::process::id());
    for b in seed.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A new ID for a message stored at `now_ms`.
pub fn next(now_ms: i64) -> String {
    let process = *PROCESS.get_or_init(|| process_part(""));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF_FFFF;
    let ms = u64::try_from(now_ms).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    format!("{ms:012X}{process:08X}{n:012X}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        init("gw-test");
        let a = next(1_700_000_000_000);
        let b = next(1_700_000_000_000);
        let c = next(1_700_000_000_001);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
        assert_ne!(a, b);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(a.starts_with(&format!("{:012X}", 1_700_000_000_000u64)));
    }
}
