//! Persistent sessions per identity, so that one identity cannot fill the sessions store
//! (`limits.max_sessions_per_identity`). Counted from the store at start and at every expiry
//! sweep; sessions this gateway creates or removes in between are added and taken off, so
//! between sweeps the count errs high (a session ended with expiry 0 is taken off by the
//! next sweep), never low by more than what other gateways created since.

use parking_lot::Mutex;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct SessionOwners {
    counts: Mutex<HashMap<String, usize>>,
}

impl SessionOwners {
    /// Replace every count with a fresh one read from the sessions store.
    pub fn replace(&self, counts: HashMap<String, usize>) {
        *self.counts.lock() = counts;
    }

    /// Count one more session for `owner` unless it holds `max` already (0: no limit).
    pub fn try_add(&self, owner: &str, max: usize) -> bool {
        let mut counts = self.counts.lock();
        let n = counts.entry(owner.to_string()).or_insert(0);
        if max > 0 && *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// A session of `owner` was removed.
    pub fn remove(&self, owner: &str) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(owner);
            }
        }
    }

    pub fn count(&self, owner: &str) -> usize {
        self.counts.lock().get(owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_owner_up_to_the_limit() {
        let o = SessionOwners::default();
        assert!(o.try_add("a", 2));
        assert!(o.try_add("a", 2));
        assert!(!o.try_add("a", 2), "third session of the same identity refused");
        assert!(o.try_add("b", 2), "another identity is not affected");
        o.remove("a");
        assert!(o.try_add("a", 2));
        assert!(o.try_add("a", 0), "0 means no limit");
        o.replace(HashMap::from([("a".to_string(), 1)]));
        assert_eq!((o.count("a"), o.count("b")), (1, 0));
    }
}
