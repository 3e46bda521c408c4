//! LMQ limits (SPEC §5) in one place: topic length, ClientId length, payload size,
//! subscriptions per client. Each check returns the reason code to answer with.

use crate::config::LimitsConfig;
use crate::protocol::ReasonCode;

/// A limit that was hit, for refusals and their counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TopicTooLong,
    ClientIdTooLong,
    PayloadTooLarge,
    TooManySubscriptions,
}

impl Refusal {
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::TopicTooLong => ReasonCode::TOPIC_NAME_INVALID,
            Refusal::ClientIdTooLong => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            Refusal::PayloadTooLarge => ReasonCode::PACKET_TOO_LARGE,
            Refusal::TooManySubscriptions => ReasonCode::QUOTA_EXCEEDED,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TopicTooLong => "topic_too_long",
            Refusal::ClientIdTooLong => "client_id_too_long",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::TooManySubscriptions => "too_many_subscriptions",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    config: LimitsConfig,
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Limits {
        Limits { config }
    }

    pub fn check_topic(&self, topic: &str) -> Result<(), Refusal> {
        if topic.chars().count() > self.config.max_topic_len {
            return Err(Refusal::TopicTooLong);
        }
        Ok(())
    }

    /// Subscription filters obey the topic length too (counted without `$share/<group>/`).
    pub fn check_filter(&self, filter: &str) -> Result<(), Refusal> {
        self.check_topic(filter)
    }

    pub fn check_client_id(&self, client_id: &str) -> Result<(), Refusal> {
        if client_id.chars().count() > self.config.max_client_id_len {
            return Err(Refusal::ClientIdTooLong);
        }
        Ok(())
    }

    pub fn check_payload(&self, len: usize) -> Result<(), Refusal> {
        if len > self.config.max_payload_bytes {
            return Err(Refusal::PayloadTooLarge);
        }
        Ok(())
    }

    /// `current` subscriptions held, adding one more.
    pub fn check_subscription_count(&self, current: usize) -> Result<(), Refusal> {
        if current >= self.config.max_subscriptions {
            return Err(Refusal::TooManySubscriptions);
        }
        Ok(())
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

    #[test]
    fn lmq_defaults() {
        let l = Limits::new(LimitsConfig::default());
        assert!(l.check_topic(&"a".repeat(64)).is_ok());
        assert_eq!(l.check_topic(&"a".repeat(65)), Err(Refusal::TopicTooLong));
        assert!(l.check_client_id(&"c".repeat(64)).is_ok());
        assert_eq!(l.check_client_id(&"c".repeat(65)), Err(Refusal::ClientIdTooLong));
        assert!(l.check_payload(65_536).is_ok());
        assert_eq!(l.check_payload(65_537), Err(Refusal::PayloadTooLarge));
        assert!(l.check_subscription_count(29).is_ok());
        assert_eq!(l.check_subscription_count(30), Err(Refusal::TooManySubscriptions));
    }
}
