//! The reserved namespace (SPEC §8): core-service topics that hold the gateway's own records
//! (status events, state stores, future delay and trace topics) or the core service's own
//! (Kafka's `__consumer_offsets`, RocketMQ's system topics). No MQTT client may publish to
//! them or subscribe to them, whatever its ACL or the parent-topic configuration says, and
//! the router never reads them as message topics.
//!
//! This is the one place that decides whether a name is reserved. The names come from the
//! configuration (`Config::reserved_topics`); [`crate::router::mapping::TopicMap`] applies them to
//! every parent → core-topic mapping, config validation refuses declared parents that touch
//! them. This module depends on nothing else of the gateway and must not grow policy about
//! who asks (connections, admin API): it only answers "reserved or not".

/// Reserved names of the Kafka core service itself: Kafka's internal topics
/// (`__consumer_offsets`, `__transaction_state`, `__share_group_state`, ...) all start with `__`.
pub const KAFKA_SYSTEM_PREFIXES: &[&str] = &["__"];

/// RocketMQ's system topics (`TopicValidator` of Apache RocketMQ): readable by any pull
/// consumer, so a device must not reach them through the gateway.
pub const ROCKETMQ_SYSTEM_TOPICS: &[&str] = &[
    "TBW102",
    "SCHEDULE_TOPIC_XXXX",
    "BenchmarkTest",
    "OFFSET_MOVED_EVENT",
    "SELF_TEST_TOPIC",
    "TRANS_CHECK_MAX_TIME_TOPIC",
    "CHECKPOINT_TOPIC",
];
/// RocketMQ system topic prefixes (`RMQ_SYS_TRACE_TOPIC`, `rmq_sys_REVIVE_LOG_...`).
pub const ROCKETMQ_SYSTEM_PREFIXES: &[&str] = &["rmq_sys_"];

/// Core-service topic names no MQTT client may reach.
///
/// Names and prefixes are compared ignoring ASCII case: the embedded engine stores a topic
/// as a directory, and on a case-insensitive file system `gid_lmq_status` would be the
/// events topic. Reserving a few more names than strictly needed costs nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReservedTopics {
    names: Vec<String>,
    prefixes: Vec<String>,
}

impl ReservedTopics {
    /// `names`: exact names (events topic, state topics, ...); `prefixes`: every name starting
    /// with one of them (`topics.reserved_prefix`, the core service's system prefixes).
    /// Empty strings are ignored (an empty prefix would reserve everything).
    pub fn new<'a>(
        names: impl IntoIterator<Item = &'a str>,
        prefixes: impl IntoIterator<Item = &'a str>,
    ) -> ReservedTopics {
        let keep = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        ReservedTopics {
            names: names.into_iter().filter_map(keep).collect(),
            prefixes: prefixes.into_iter().filter_map(keep).collect(),
        }
    }

    /// Whether `name` (a core-service topic or an MQTT parent topic) is reserved. Called per
    /// routed record: no allocation.
    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
            || self.prefixes.iter().any(|p| name.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p)))
    }

    /// The exact reserved names (for messages and documentation).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The reserved prefixes.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_prefixes_match_ignoring_case() {
        let r = ReservedTopics::new(["GID_LMQ_STATUS", "LMQ_GATEWAY_STATE"], ["lmq-", "__"]);
        for name in
            ["GID_LMQ_STATUS", "gid_lmq_status", "LMQ_GATEWAY_STATE", "lmq-sessions", "LMQ-delay", "__consumer_offsets"]
        {
            assert!(r.contains(name), "{name} is reserved");
        }
        for name in ["GID_LMQ_STATUS2", "sensors", "lmq", "lmq_sessions", "_x", "", "é"] {
            assert!(!r.contains(name), "{name} is not reserved");
        }
    }

    #[test]
    fn empty_entries_reserve_nothing() {
        let r = ReservedTopics::new([""], [""]);
        assert!(!r.contains("sensors"));
        assert!(!r.contains(""));
    }
}
