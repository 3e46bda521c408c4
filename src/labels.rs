//! Label values of the gateway's metrics that more than one module names: limit refusals
//! ([`Refusal`]), refused delayed messages ([`Refused`]), authentication modes ([`AuthMode`])
//! and authentication failures ([`FAILURE_LABELS`]).
//!
//! They are defined here, in a leaf that depends only on `protocol`, so that `metrics` can
//! start every labelled series at zero without importing the modules that count them
//! (`limits`, `delay`, `auth`), which all import `metrics`: data flows one way. Those modules
//! re-export their items (`limits::Refusal`, `delay::Refused`, `auth::AuthMode`, …).

use crate::protocol::ReasonCode;

/// A limit that was hit, for refusals and their counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TopicTooLong,
    ClientIdTooLong,
    PayloadTooLarge,
    TooManySubscriptions,
    /// More retained messages matched a SUBSCRIBE than `mqtt.max_retained_per_subscribe`
    /// (the rest are not sent; the subscription itself is granted).
    RetainedPerSubscribe,
    /// The client left its output backed up longer than `mqtt.write_stall_timeout_secs`.
    SlowReader,
    /// A retained PUBLISH beyond `limits.max_retained_messages` / `max_retained_bytes`.
    RetainedStoreFull,
    /// A PUBLISH or SUBSCRIBE aimed at the reserved namespace (events, state, system topics).
    ReservedTopic,
    /// A PUBLISH or SUBSCRIBE needing a new core topic for a `*` parent beyond
    /// `limits.max_core_topics`.
    CoreTopicLimit,
    /// A SUBSCRIBE joining more share groups than `limits.max_share_groups_per_client`.
    TooManyShareGroups,
    /// A client acknowledged more than `mqtt.max_acked_above` messages above its oldest
    /// unacknowledged one.
    AckedAboveLimit,
    /// A CONNECT creating a persistent session beyond `limits.max_sessions_per_identity`.
    SessionsPerIdentity,
    /// A delayed will beyond `limits.max_delayed_wills_per_identity` (published at once).
    DelayedWillsPerIdentity,
    /// A `$SYS/getOfflineMsg` beyond 5 per second, or while earlier pulls still wait to be sent.
    OfflinePullLimit,
}

/// Number of [`Refusal`] reasons.
pub const REFUSALS: usize = 14;

impl Refusal {
    pub const ALL: [Refusal; REFUSALS] = [
        Refusal::TopicTooLong,
        Refusal::ClientIdTooLong,
        Refusal::PayloadTooLarge,
        Refusal::TooManySubscriptions,
        Refusal::RetainedPerSubscribe,
        Refusal::SlowReader,
        Refusal::RetainedStoreFull,
        Refusal::ReservedTopic,
        Refusal::CoreTopicLimit,
        Refusal::TooManyShareGroups,
        Refusal::AckedAboveLimit,
        Refusal::SessionsPerIdentity,
        Refusal::DelayedWillsPerIdentity,
        Refusal::OfflinePullLimit,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::TopicTooLong => ReasonCode::TOPIC_NAME_INVALID,
            Refusal::ClientIdTooLong => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            Refusal::PayloadTooLarge => ReasonCode::PACKET_TOO_LARGE,
            Refusal::TooManySubscriptions
            | Refusal::RetainedPerSubscribe
            | Refusal::SlowReader
            | Refusal::RetainedStoreFull
            | Refusal::CoreTopicLimit
            | Refusal::TooManyShareGroups
            | Refusal::AckedAboveLimit
            | Refusal::SessionsPerIdentity
            | Refusal::DelayedWillsPerIdentity
            | Refusal::OfflinePullLimit => ReasonCode::QUOTA_EXCEEDED,
            Refusal::ReservedTopic => ReasonCode::NOT_AUTHORIZED,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TopicTooLong => "topic_too_long",
            Refusal::ClientIdTooLong => "client_id_too_long",
            Refusal::PayloadTooLarge => "payload_too_large",
            Refusal::TooManySubscriptions => "too_many_subscriptions",
            Refusal::RetainedPerSubscribe => "retained_per_subscribe",
            Refusal::SlowReader => "slow_reader",
            Refusal::RetainedStoreFull => "retained_store_full",
            Refusal::ReservedTopic => "reserved_topic",
            Refusal::CoreTopicLimit => "core_topic_limit",
            Refusal::TooManyShareGroups => "too_many_share_groups",
            Refusal::AckedAboveLimit => "acked_above_limit",
            Refusal::SessionsPerIdentity => "sessions_per_identity",
            Refusal::DelayedWillsPerIdentity => "delayed_wills_per_identity",
            Refusal::OfflinePullLimit => "offline_pull_limit",
        }
    }
}

/// Why a delayed PUBLISH is refused (label of `lmq_delayed_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `$delayed/<seconds>/…` without a number of seconds and a topic, or a
    /// `__STARTDELIVERTIME` that is not epoch milliseconds.
    Malformed,
    /// More than 40 days ahead.
    TooLong,
}

impl Refused {
    pub const ALL: [Refused; 2] = [Refused::Malformed, Refused::TooLong];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::TooLong => "too_long",
        }
    }
}

/// How a client authenticated (also the `mode` metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMode {
    Anonymous,
    Signature,
    Token,
    DeviceCredential,
    /// No user name; the TLS client certificate's CN is the identity (`auth.tls_client_cn_identity`).
    Certificate,
    /// A user name of no known mode (failures only).
    Unknown,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Anonymous => "anonymous",
            AuthMode::Signature => "signature",
            AuthMode::Token => "token",
            AuthMode::DeviceCredential => "device_credential",
            AuthMode::Certificate => "certificate",
            AuthMode::Unknown => "unknown",
        }
    }
}

/// Every (`mode`, `reason`) pair an [`AuthFailure`](crate::auth::AuthFailure) can carry, so that the failure counters
/// exist at zero before the first failure. The auth tests check that each failure they
/// provoke is listed here.
pub const FAILURE_LABELS: &[(AuthMode, &str)] = &[
    (AuthMode::Anonymous, "client_id_invalid"),
    (AuthMode::Anonymous, "missing_username"),
    (AuthMode::Certificate, "client_id_not_cn"),
    (AuthMode::Unknown, "client_id_invalid"),
    (AuthMode::Unknown, "bad_username"),
    (AuthMode::Signature, "client_id_invalid"),
    (AuthMode::Signature, "instance_mismatch"),
    (AuthMode::Signature, "missing_password"),
    (AuthMode::Signature, "unknown_access_key"),
    (AuthMode::Signature, "bad_signature"),
    (AuthMode::Token, "client_id_invalid"),
    (AuthMode::Token, "instance_mismatch"),
    (AuthMode::Token, "missing_password"),
    (AuthMode::Token, "unknown_access_key"),
    (AuthMode::Token, "forged_token"),
    (AuthMode::Token, "expired_token"),
    (AuthMode::Token, "revoked_token"),
    (AuthMode::Token, "resource_mismatch"),
    (AuthMode::Token, "permission_mismatch"),
    (AuthMode::Token, "bad_signature"),
    (AuthMode::DeviceCredential, "client_id_invalid"),
    (AuthMode::DeviceCredential, "instance_mismatch"),
    (AuthMode::DeviceCredential, "missing_password"),
    (AuthMode::DeviceCredential, "server_unavailable"),
    (AuthMode::DeviceCredential, "unknown_access_key"),
    (AuthMode::DeviceCredential, "client_id_mismatch"),
    (AuthMode::DeviceCredential, "bad_signature"),
];
