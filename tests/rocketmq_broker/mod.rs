//! A real RocketMQ broker for the tests that need one, started once per test binary.
//!
//! - `LMQ_TEST_ROCKETMQ=<host:port>`: use that name server (a broker already running).
//! - Otherwise, when the Apache RocketMQ jars are installed (`scripts/rocketmq-dev.sh install`
//!   resolves them from Maven Central; Java runs them), start a fresh name server and broker on
//!   free ports through `scripts/rocketmq-dev.sh start` and stop them when the test binary exits.
//! - Otherwise the tests are skipped with a loud message, unless `LMQ_REQUIRE_ROCKETMQ=1`
//!   (set by `scripts/test.sh`, so CI never skips them), in which case they fail.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

static BROKER: OnceLock<Option<String>> = OnceLock::new();
static BROKER_DIR: OnceLock<PathBuf> = OnceLock::new();

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rocketmq-dev.sh")
}

/// Whether `scripts/rocketmq-dev.sh` can start a broker (its jars are in the cache, `java` runs).
fn installed() -> bool {
    Command::new(script()).arg("installed").status().is_ok_and(|s| s.success())
}

fn free_port_block() -> (u16, u16) {
    // Name server port, broker port (the broker also takes port+1 and port-2).
    loop {
        let base = 20_000 + rand_u16() % 12_000;
        let ports = [base, base + 2, base + 4, base + 5];
        if ports.iter().all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()) {
            return (base, base + 4);
        }
    }
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    ((nanos / 1000) ^ std::process::id()) as u16
}

extern "C" fn stop_broker() {
    if let Some(dir) = BROKER_DIR.get() {
        let _ = Command::new(script()).arg("stop").arg(dir).status();
    }
}

fn start() -> Option<String> {
    if let Ok(addr) = std::env::var("LMQ_TEST_ROCKETMQ") {
        if !addr.is_empty() {
            return Some(addr);
        }
    }
    if !installed() {
        let msg = "RocketMQ tests SKIPPED: no LMQ_TEST_ROCKETMQ and no Apache RocketMQ jars or no java \
                   (run scripts/rocketmq-dev.sh install)";
        if std::env::var("LMQ_REQUIRE_ROCKETMQ").is_ok_and(|v| v == "1") {
            panic!("{msg}");
        }
        eprintln!("\n!!!!! {msg} !!!!!\n");
        return None;
    }
    let (namesrv_port, broker_port) = free_port_block();
    let out = Command::new(script())
        .arg("start")
        .env("NAMESRV_PORT", namesrv_port.to_string())
        .env("BROKER_PORT", broker_port.to_string())
        .output()
        .expect("run scripts/rocketmq-dev.sh start");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "broker start failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let field = |name: &str| {
        stdout.lines().find_map(|l| l.strip_prefix(name).map(str::to_owned)).unwrap_or_else(|| panic!("no {name}"))
    };
    let dir = PathBuf::from(field("ROCKETMQ_HOME="));
    let _ = BROKER_DIR.set(dir);
    // SAFETY: registering a plain `extern "C" fn` with the C library's exit handlers.
    #[allow(unsafe_code)]
    unsafe {
        libc::atexit(stop_broker)
    };
    Some(field("LMQ_TEST_ROCKETMQ="))
}

/// A broker of one test's own (to stop it under a running gateway), stopped when dropped.
pub struct OwnBroker {
    pub namesrv: String,
    dir: PathBuf,
    ports: (u16, u16),
}

impl OwnBroker {
    /// `None` when the tests are to be skipped (see [`namesrv`]).
    pub fn start() -> Option<OwnBroker> {
        namesrv()?;
        if !installed() {
            let msg = "RocketMQ test SKIPPED: it needs a broker of its own and the Apache RocketMQ jars are not \
                       installed (run scripts/rocketmq-dev.sh install)";
            if std::env::var("LMQ_REQUIRE_ROCKETMQ").is_ok_and(|v| v == "1") {
                panic!("{msg}");
            }
            eprintln!("\n!!!!! {msg} !!!!!\n");
            return None;
        }
        let (namesrv_port, broker_port) = free_port_block();
        let out = Command::new(script())
            .arg("start")
            .env("NAMESRV_PORT", namesrv_port.to_string())
            .env("BROKER_PORT", broker_port.to_string())
            .output()
            .expect("run scripts/rocketmq-dev.sh start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "broker start failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let dir = stdout.lines().find_map(|l| l.strip_prefix("ROCKETMQ_HOME=")).expect("ROCKETMQ_HOME").into();
        Some(OwnBroker { namesrv: format!("127.0.0.1:{namesrv_port}"), dir, ports: (namesrv_port, broker_port) })
    }

    /// Stop the name server and the broker and start them again on the same data and ports.
    pub fn restart(&self) {
        let status = Command::new(script())
            .arg("restart")
            .arg(&self.dir)
            .env("NAMESRV_PORT", self.ports.0.to_string())
            .env("BROKER_PORT", self.ports.1.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/rocketmq-dev.sh restart");
        assert!(status.success(), "broker restart failed");
    }

    /// Stop the name server and the broker (files are deleted too).
    pub fn stop(&self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Name server address of the test broker, or `None` when the tests are to be skipped.
pub fn namesrv() -> Option<String> {
    BROKER.get_or_init(start).clone()
}

/// A name unique to this test run (topics, ClientIds), so a reused broker never mixes runs.
pub fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        format!("{}{}", std::process::id(), t % 100_000_000)
    })
}

/// Plain RocketMQ clients (not the gateway's) for checking what other applications see.
pub mod plain {
    #![allow(deprecated)]

    use rocketmq_client_rust::{
        ClientRuntime, ClientRuntimeConfig, DefaultMQProducer, DefaultMQPullConsumer, PullStatus,
    };
    use rocketmq_model::common::message::message_ext::MessageExt;
    use rocketmq_model::common::message::message_queue::MessageQueue;
    use rocketmq_runtime::{RuntimeConfig, RuntimeOwner};
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock};
    use std::time::Duration;

    static OWNER: LazyLock<RuntimeOwner> = LazyLock::new(|| {
        RuntimeOwner::plan(RuntimeConfig::for_parallelism("plain-rocketmq-client", 1))
            .expect("runtime config")
            .build()
            .expect("plain client runtime")
    });

    fn runtime() -> Arc<ClientRuntime> {
        ClientRuntime::try_new(
            OWNER.root_context().component("plain"),
            ClientRuntimeConfig::default(),
            rocketmq_client_rust::TelemetryHandle::noop(),
        )
        .expect("client runtime")
    }

    pub async fn producer(namesrv: &str) -> DefaultMQProducer {
        let mut p = DefaultMQProducer::builder(runtime())
            .producer_group(format!("plain_producer_{}", super::run_id()))
            .name_server_addr(namesrv)
            .send_msg_timeout(5000)
            .build();
        p.start().await.expect("plain producer starts");
        p
    }

    /// A classic pull consumer reading a topic from the offsets it had when created.
    pub struct Reader {
        consumer: DefaultMQPullConsumer,
        queues: Vec<MessageQueue>,
        next: HashMap<i32, i64>,
        expression: String,
    }

    impl Reader {
        /// Reader of `topic` with the tag expression `expression` (`*`, `a||b`), starting at the end.
        pub async fn at_end(namesrv: &str, topic: &str, expression: &str) -> Reader {
            let consumer = DefaultMQPullConsumer::builder(runtime())
                .consumer_group(format!("plain_reader_{}", super::run_id()))
                .name_server_addr(namesrv)
                .consumer_pull_timeout(Duration::from_secs(5))
                .build()
                .expect("plain consumer");
            consumer.start().await.expect("plain consumer starts");
            let queues = consumer.fetch_subscribe_message_queues(topic).await.expect("topic queues");
            let mut next = HashMap::new();
            for q in &queues {
                next.insert(q.queue_id(), consumer.max_offset(q).await.expect("max offset"));
            }
            Reader { consumer, queues, next, expression: expression.to_owned() }
        }

        /// Messages that arrived since the last read (all queues), waiting up to `wait` for at
        /// least `min` of them.
        pub async fn read(&mut self, min: usize, wait: Duration) -> Vec<MessageExt> {
            let deadline = tokio::time::Instant::now() + wait;
            let mut out = Vec::new();
            loop {
                for q in &self.queues {
                    let from = self.next[&q.queue_id()];
                    let Ok(r) = self.consumer.pull(q, &self.expression, from, 32).await else { continue };
                    if matches!(r.pull_status(), PullStatus::Found) {
                        out.extend(r.msg_found_list().unwrap_or_default().iter().cloned());
                    }
                    self.next.insert(q.queue_id(), i64::try_from(r.next_begin_offset()).unwrap_or(from).max(from));
                }
                if out.len() >= min || tokio::time::Instant::now() >= deadline {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
