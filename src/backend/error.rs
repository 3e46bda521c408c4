//! [`BackendError`]: what a core-service call failed with, the failure underneath it, and
//! whether trying again can help.
//!
//! Each variant names the kind of failure; where the failure comes from another error (an io
//! error, librdkafka's `KafkaError`, the RocketMQ client's `ClientError`, a redb error, a
//! serde_json error, a task's `JoinError`...) that error is kept as the
//! [`source`](std::error::Error::source), so a caller can inspect it (downcast it, or walk the
//! chain as [`BackendError::is_retriable`] does). A failure with nothing underneath (a closed
//! channel, an unexpected broker answer, a check of this gateway's own) carries a message only.
//!
//! The Display text includes the source's text (`core service storage error: state cache:
//! No space left on device`). The usual advice is one or the other, but the gateway logs errors
//! with `error = %e`, which prints Display alone, and those lines must keep saying what failed;
//! a reporter that walks the chain prints the source's text twice.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// An underlying error of any type, as kept by [`BackendError`].
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service cannot be reached or refuses work right now; retrying later may succeed.
    #[error("core service unavailable: {}", Detail(.context, .source))]
    Unavailable {
        /// What was being done, or the whole message when there is no source.
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    /// The topic (or the partition) does not exist in the service. `topic` is empty when the
    /// service's error does not name it (librdkafka's).
    #[error("unknown core-service topic{}", TopicDetail(.topic, .source))]
    UnknownTopic {
        topic: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The service did not answer within the time given.
    #[error("core service timed out after {0:?}")]
    Timeout(Duration),
    /// Reading or writing local storage failed (the embedded log, a state cache, a record
    /// that cannot be encoded).
    #[error("core service storage error: {}", Detail(.context, .source))]
    Storage {
        /// What was being done, or the whole message when there is no source.
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
    /// The service was shut down by this process.
    #[error("core service closed")]
    Closed,
    /// The service refuses this record for good (too large for the topic, not authorised):
    /// sending it again cannot succeed.
    #[error("core service refused the record: {}", Detail(.context, .source))]
    Rejected {
        /// What was being done, or the whole message when there is no source.
        context: Cow<'static, str>,
        #[source]
        source: Option<BoxError>,
    },
}

impl BackendError {
    /// [`BackendError::Unavailable`] with a message and nothing underneath.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        BackendError::Unavailable { context: message.into(), source: None }
    }

    /// [`BackendError::Unavailable`] caused by `source` while doing `context` (may be empty).
    pub fn unavailable_from(
        context: impl Into<Cow<'static, str>>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        BackendError::Unavailable { context: context.into(), source: Some(Box::new(source)) }
    }

    /// [`BackendError::UnknownTopic`] for `topic` (or partition: `topic-3`).
    pub fn unknown_topic(topic: impl Into<String>) -> Self {
        BackendError::UnknownTopic { topic: topic.into(), source: None }
    }

    /// [`BackendError::UnknownTopic`] as the service reported it (`topic` may be empty).
    pub fn unknown_topic_from(topic: impl Into<String>, source: impl StdError + Send + Sync + 'static) -> Self {
        BackendError::UnknownTopic { topic: topic.into(), source: Some(Box::new(source)) }
    }

    /// [`BackendError::Storage`] with a message and nothing underneath.
    pub fn storage(message: impl Into<Cow<'static, str>>) -> Self {
        BackendError::Storage { context: message.into(), source: None }
    }

    /// [`BackendError::Storage`] caused by `source` while doing `context` (may be empty).
    pub fn storage_from(context: impl Into<Cow<'static, str>>, source: impl StdError + Send + Sync + 'static) -> Self {
        BackendError::Storage { context: context.into(), source: Some(Box::new(source)) }
    }

    /// [`BackendError::Rejected`] with a message and nothing underneath.
    pub fn rejected(message: impl Into<Cow<'static, str>>) -> Self {
        BackendError::Rejected { context: message.into(), source: None }
    }

    /// [`BackendError::Rejected`] caused by `source` while doing `context` (may be empty).
    pub fn rejected_from(context: impl Into<Cow<'static, str>>, source: impl StdError + Send + Sync + 'static) -> Self {
        BackendError::Rejected { context: context.into(), source: Some(Box::new(source)) }
    }

    /// [`BackendError::Storage`] for one of several waiters on a write that failed with `e`:
    /// an io error cannot be cloned, so each gets a copy with its kind and text.
    pub fn storage_io_copy(e: &std::io::Error) -> Self {
        BackendError::storage_from("", std::io::Error::new(e.kind(), e.to_string()))
    }

    /// Whether the same call, made again later, may succeed.
    ///
    /// - [`Unavailable`](BackendError::Unavailable), [`Timeout`](BackendError::Timeout): yes,
    ///   that is what they mean.
    /// - [`Storage`](BackendError::Storage): only when the first [`std::io::Error`] in the
    ///   source chain is of kind `Interrupted`, `WouldBlock` or `TimedOut` (the operation was
    ///   cut short, the data is fine). Any other io error (disk full, permission, corrupt or
    ///   missing file) stays until someone acts, and a source that shows no io error in its
    ///   chain (a message only, serde_json, a failed task, redb's errors, which do not expose
    ///   their io error as a source) is taken as lasting: a retry loop must not spin on it.
    /// - [`UnknownTopic`](BackendError::UnknownTopic), [`Closed`](BackendError::Closed),
    ///   [`Rejected`](BackendError::Rejected): no; the topic must be created, the service
    ///   reopened, the record changed first.
    pub fn is_retriable(&self) -> bool {
        match self {
            BackendError::Unavailable { .. } | BackendError::Timeout(_) => true,
            BackendError::Storage { source, .. } => source.as_deref().is_some_and(|s| interrupted_io(s)),
            BackendError::UnknownTopic { .. } | BackendError::Closed | BackendError::Rejected { .. } => false,
        }
    }
}

/// Whether the first io error in `e`'s chain (`e` included) only cut an operation short.
fn interrupted_io(e: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{Interrupted, TimedOut, WouldBlock};
            return matches!(io.kind(), Interrupted | WouldBlock | TimedOut);
        }
        next = e.source();
    }
    false
}

/// An io error as a storage error: Display `core service storage error: {e}`, as before the
/// error was kept.
impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        BackendError::storage_from("", e)
    }
}

/// `context: source`, or the one of them there is.
struct Detail<'a>(&'a str, &'a Option<BoxError>);

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (context, None) => f.write_str(context),
            ("", Some(source)) => write!(f, "{source}"),
            (context, Some(source)) => write!(f, "{context}: {source}"),
        }
    }
}

/// `` `topic` ``, then `: source` when there is one.
struct TopicDetail<'a>(&'a str, &'a Option<BoxError>);

impl fmt::Display for TopicDetail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.is_empty() {
            write!(f, " `{}`", self.0)?;
        }
        match self.1 {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn io_err(kind: io::ErrorKind) -> BackendError {
        BackendError::from(io::Error::new(kind, "boom"))
    }

    #[test]
    fn an_io_error_is_kept_as_the_source() {
        let e = io_err(io::ErrorKind::PermissionDenied);
        let source = StdError::source(&e).expect("an io-based error has a source");
        let io = source.downcast_ref::<io::Error>().expect("the source is the io error itself");
        assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(e.to_string(), "core service storage error: boom");
    }

    #[test]
    fn a_source_behind_a_context_is_kept() {
        let e = BackendError::storage_from("state cache", io::Error::other("disk on fire"));
        assert_eq!(e.to_string(), "core service storage error: state cache: disk on fire");
        assert!(StdError::source(&e).and_then(|s| s.downcast_ref::<io::Error>()).is_some());
        let e = BackendError::unavailable_from("rocketmq send", io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(StdError::source(&e).and_then(|s| s.downcast_ref::<io::Error>()).is_some());
        let json = serde_json::from_str::<u32>("x").expect_err("not a number");
        let e = BackendError::storage_from("checkpoint", json);
        assert!(StdError::source(&e).and_then(|s| s.downcast_ref::<serde_json::Error>()).is_some());
    }

    #[test]
    fn a_message_has_no_source() {
        for e in [
            BackendError::unavailable("no consumer groups"),
            BackendError::unknown_topic("t"),
            BackendError::storage("bad name"),
            BackendError::rejected("too large"),
            BackendError::Timeout(Duration::from_secs(1)),
            BackendError::Closed,
        ] {
            assert!(StdError::source(&e).is_none(), "{e:?}");
        }
    }

    #[test]
    fn retriable_by_variant() {
        assert!(BackendError::unavailable("down").is_retriable());
        assert!(BackendError::unavailable_from("send", io::Error::other("reset")).is_retriable());
        assert!(BackendError::Timeout(Duration::from_secs(3)).is_retriable());
        assert!(!BackendError::unknown_topic("t").is_retriable());
        assert!(!BackendError::unknown_topic_from("t", io::Error::from(io::ErrorKind::TimedOut)).is_retriable());
        assert!(!BackendError::Closed.is_retriable());
        assert!(!BackendError::rejected("too large").is_retriable());
        assert!(!BackendError::rejected_from("", io::Error::from(io::ErrorKind::Interrupted)).is_retriable());
    }

    #[test]
    fn storage_is_retriable_only_for_an_interrupted_io_error() {
        for kind in [io::ErrorKind::Interrupted, io::ErrorKind::WouldBlock, io::ErrorKind::TimedOut] {
            assert!(io_err(kind).is_retriable(), "{kind:?}");
        }
        for kind in [
            io::ErrorKind::StorageFull,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::NotFound,
            io::ErrorKind::InvalidData,
            io::ErrorKind::UnexpectedEof,
            io::ErrorKind::Other,
        ] {
            assert!(!io_err(kind).is_retriable(), "{kind:?}");
        }
        // No io error in the chain: a message, serde_json.
        assert!(!BackendError::storage("filled from elsewhere").is_retriable());
        let json = serde_json::from_str::<u32>("x").expect_err("not a number");
        assert!(!BackendError::storage_from("checkpoint", json).is_retriable());
    }

    #[test]
    fn storage_looks_for_the_io_error_down_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapper(#[source] io::Error);
        let e = BackendError::storage_from("cache", Wrapper(io::Error::from(io::ErrorKind::Interrupted)));
        assert!(e.is_retriable());
        let e = BackendError::storage_from("cache", Wrapper(io::Error::from(io::ErrorKind::StorageFull)));
        assert!(!e.is_retriable());
    }

    /// The phrases logs, tests and operators match on.
    #[test]
    fn display_texts() {
        let cases = [
            (BackendError::unavailable("injected"), "core service unavailable: injected"),
            (
                BackendError::unavailable_from("rocketmq send", io::Error::other("reset")),
                "core service unavailable: rocketmq send: reset",
            ),
            (BackendError::unavailable_from("", io::Error::other("reset")), "core service unavailable: reset"),
            (BackendError::unknown_topic("lmq-a"), "unknown core-service topic `lmq-a`"),
            (BackendError::unknown_topic("lmq-a-2"), "unknown core-service topic `lmq-a-2`"),
            (
                BackendError::unknown_topic_from("lmq-a", io::Error::other("no route")),
                "unknown core-service topic `lmq-a`: no route",
            ),
            (
                BackendError::unknown_topic_from("", io::Error::other("UnknownTopicOrPartition")),
                "unknown core-service topic: UnknownTopicOrPartition",
            ),
            (BackendError::Timeout(Duration::from_millis(1500)), "core service timed out after 1.5s"),
            (BackendError::storage("invalid topic name `a b`"), "core service storage error: invalid topic name `a b`"),
            (
                BackendError::storage_from("state cache", io::Error::other("full")),
                "core service storage error: state cache: full",
            ),
            (BackendError::Closed, "core service closed"),
            (BackendError::rejected("MessageSizeTooLarge"), "core service refused the record: MessageSizeTooLarge"),
            (
                BackendError::rejected_from("", io::Error::other("MessageSizeTooLarge")),
                "core service refused the record: MessageSizeTooLarge",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }
}
