//! LMQ limits (SPEC §5) in one place: topic length, ClientId length, payload size,
//! subscriptions per client; the reserved namespace (SPEC §8; which names are reserved is
//! `config::reserved`'s decision, counting the refusal is this module's); and the
//! per-connection bounds of SPEC §8 that a client's behaviour can hit (retained messages per
//! SUBSCRIBE, a client that does not read, the retained store). Each check returns the reason
//! code to answer with; every refusal is counted by reason
//! (`lmq_limit_refusals_total`) and logged at most once per interval per reason.

use prometheus::IntCounter;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::config::LimitsConfig;

/// Refusals of one reason are logged at most this often.
const LOG_EVERY_MS: i64 = 10_000;

// Defined in `labels`, so that `metrics` can label its counters without importing `limits`.
pub use crate::labels::{Refusal, REFUSALS};

#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    /// The metric counters themselves, one per reason.
    refused: [IntCounter; REFUSALS],
    /// Per reason: when it was last logged, and how many since.
    last_logged_ms: [AtomicI64; REFUSALS],
    unlogged: [AtomicU64; REFUSALS],
}

impl Limits {
    pub fn new(config: LimitsConfig, metrics: &crate::metrics::Metrics) -> Limits {
        Limits {
            config,
            refused: Refusal::ALL.map(|r| metrics.refusal(r)),
            last_logged_ms: Default::default(),
            unlogged: Default::default(),
        }
    }

    /// Refusals so far for one reason.
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r.index()].get()
    }

    fn refuse(&self, r: Refusal) -> Refusal {
        let i = r.index();
        self.refused[i].inc();
        self.unlogged[i].fetch_add(1, Ordering::Relaxed);
        let now = crate::now_ms();
        let last = self.last_logged_ms[i].load(Ordering::Relaxed);
        if now - last >= LOG_EVERY_MS
            && self.last_logged_ms[i].compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let n = self.unlogged[i].swap(0, Ordering::Relaxed);
            tracing::warn!(reason = r.as_str(), count = n, "limit refusals (logged at most every 10 s per reason)");
        }
        r
    }

    pub fn check_topic(&self, topic: &str) -> Result<(), Refusal> {
        if topic.chars().count() > self.config.max_topic_len {
            return Err(self.refuse(Refusal::TopicTooLong));
        }
        Ok(())
    }

    /// Subscription filters obey the topic length too (counted without `$share/<group>/`).
    pub fn check_filter(&self, filter: &str) -> Result<(), Refusal> {
        self.check_topic(filter)
    }

    pub fn check_client_id(&self, client_id: &str) -> Result<(), Refusal> {
        if client_id.chars().count() > self.config.max_client_id_len {
            return Err(self.refuse(Refusal::ClientIdTooLong));
        }
        Ok(())
    }

    pub fn check_payload(&self, len: usize) -> Result<(), Refusal> {
        if len > self.config.max_payload_bytes {
            return Err(self.refuse(Refusal::PayloadTooLarge));
        }
        Ok(())
    }

    /// `current` subscriptions held, adding one more.
    pub fn check_subscription_count(&self, current: usize) -> Result<(), Refusal> {
        if current >= self.config.max_subscriptions {
            return Err(self.refuse(Refusal::TooManySubscriptions));
        }
        Ok(())
    }

    /// `groups`: distinct share groups the client would be in, this SUBSCRIBE's included.
    pub fn check_share_groups(&self, groups: usize) -> Result<(), Refusal> {
        if groups > self.config.max_share_groups_per_client {
            return Err(self.refuse(Refusal::TooManyShareGroups));
        }
        Ok(())
    }

    /// Count (and log, rate-limited) a refusal decided elsewhere: retained messages left
    /// out of a SUBSCRIBE, a slow reader disconnected.
    pub fn count(&self, r: Refusal) -> Refusal {
        self.refuse(r)
    }

    /// Count (and log, rate-limited) a PUBLISH or SUBSCRIBE refused because its topic is
    /// reserved; returns the refusal to answer with.
    pub fn refuse_reserved(&self) -> Refusal {
        self.refuse(Refusal::ReservedTopic)
    }

    /// Largest packet a client may send: the payload limit plus room for the topic and
    /// properties, so that an oversized payload is refused from the fixed header alone.
    pub fn max_packet_size(&self) -> usize {
        self.config.max_payload_bytes + 64 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ReasonCode;

    #[test]
    fn lmq_defaults() {
        let l = Limits::new(LimitsConfig::default(), &crate::metrics::Metrics::new());
        assert!(l.check_topic(&"a".repeat(64)).is_ok());
        assert_eq!(l.check_topic(&"a".repeat(65)), Err(Refusal::TopicTooLong));
        assert!(l.check_client_id(&"c".repeat(64)).is_ok());
        assert_eq!(l.check_client_id(&"c".repeat(65)), Err(Refusal::ClientIdTooLong));
        assert!(l.check_payload(65_536).is_ok());
        assert_eq!(l.check_payload(65_537), Err(Refusal::PayloadTooLarge));
        assert!(l.check_subscription_count(29).is_ok());
        assert_eq!(l.check_subscription_count(30), Err(Refusal::TooManySubscriptions));
        l.count(Refusal::RetainedPerSubscribe);
        l.count(Refusal::SlowReader);
        l.count(Refusal::RetainedStoreFull);
        assert!(l.check_share_groups(10).is_ok());
        assert_eq!(l.check_share_groups(11), Err(Refusal::TooManyShareGroups));
        l.count(Refusal::CoreTopicLimit);
        l.count(Refusal::AckedAboveLimit);
        l.count(Refusal::SessionsPerIdentity);
        l.count(Refusal::DelayedWillsPerIdentity);
        l.count(Refusal::OfflinePullLimit);
        assert_eq!(l.refuse_reserved().reason_code(), ReasonCode::NOT_AUTHORIZED);
        for r in Refusal::ALL {
            assert_eq!(l.refused(r), 1, "{r:?} counted once");
        }
    }
}
