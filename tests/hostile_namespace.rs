//! The reserved namespace (SPEC §8) on the embedded core service: the checks of
//! `tests/hostile/namespace.rs` (`tests/kafka.rs` and `tests/rocketmq.rs` run them on the
//! brokers), and the configuration's refusal of parents mapped onto reserved topics.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

mod common;
#[macro_use]
mod hostile;

use lmq_gateway::config::Config;

for_each_namespace_check!(on_embedded);

#[test]
fn config_refuses_parents_mapped_onto_reserved_topics() {
    for (yaml, reserved) in [
        ("topics:\n  parents:\n    - name: foo\n      core_topic: lmq-sessions\n", "lmq-sessions"),
        ("topics:\n  parents:\n    - name: foo\n      core_topic: GID_LMQ_STATUS\n", "GID_LMQ_STATUS"),
        ("topics:\n  events_topic: EV\n  parents:\n    - name: status\n      core_topic: EV\n", "EV"),
        ("topics:\n  parents:\n    - name: GID_LMQ_STATUS\n", "GID_LMQ_STATUS"),
        (
            "core:\n  kind: kafka\ntopics:\n  parents:\n    - name: creds\n      core_topic: lmq-credentials\n",
            "lmq-credentials",
        ),
        (
            "core:\n  kind: rocketmq\ntopics:\n  parents:\n    - name: st\n      core_topic: LMQ_GATEWAY_STATE\n",
            "LMQ_GATEWAY_STATE",
        ),
    ] {
        let err = Config::from_yaml(yaml).expect_err(yaml).to_string();
        assert!(err.contains(&format!("`{reserved}` is reserved")), "{yaml}: {err}");
    }
    assert!(Config::from_yaml("topics:\n  parents:\n    - name: foo\n      core_topic: iot.foo\n").is_ok());
}
