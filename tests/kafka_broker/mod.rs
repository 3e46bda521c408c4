//! Apache Kafka brokers for tests, started through `scripts/kafka-dev.sh run` (one KRaft
//! process, broker and controller): one shared per test binary ([`shared`]) or owned by a test
//! that stops and restarts it ([`KafkaBroker::start`]). Each broker has its own ports and data
//! directory, and dies with the thread that started it.

#![allow(dead_code)]

use lmq_gateway::config::KafkaConfig;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct KafkaBroker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-dev.sh")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Spawn the broker; it is killed when the thread that spawned it ends (PR_SET_PDEATHSIG,
/// kept across the script's `exec` of the JVM).
fn spawn(dir: &Path, port: u16) -> Child {
    let installed = Command::new(script()).arg("installed").status().is_ok_and(|s| s.success());
    assert!(installed, "Apache Kafka is not installed: run `scripts/kafka-dev.sh install` (scripts/test.sh does)");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("broker.log")).expect("broker log");
    let mut cmd = Command::new(script());
    cmd.arg("run")
        .arg(dir)
        .arg(port.to_string())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null());
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("start Kafka")
}

fn wait_ready(dir: &Path, port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
            panic!("Kafka on port {port} exited ({status}) before it answered; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
    panic!("Kafka on port {port} not ready within 90 s; log:\n{log}");
}

impl KafkaBroker {
    /// A broker owned by the caller, in a fresh directory. Must be created (and restarted)
    /// from a thread that outlives it — a `#[tokio::test]`'s own thread is fine.
    pub fn start() -> KafkaBroker {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let mut child = spawn(&dir, port);
        wait_ready(&dir, port, &mut child);
        KafkaBroker { port, dir, child: Some(child), _tmp: Some(tmp) }
    }

    /// A handle with the same port and settings that does not own the process.
    pub fn clone_handle(&self) -> KafkaBroker {
        KafkaBroker { port: self.port, dir: self.dir.clone(), child: None, _tmp: None }
    }

    pub fn bootstrap(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// Client settings for tests: small batches, two partitions per gateway topic.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig { bootstrap_servers: self.bootstrap(), linger_ms: 1, partitions: 2, ..KafkaConfig::default() }
    }

    /// The `core:` section of a gateway.yaml for this broker.
    pub fn core_yaml(&self) -> String {
        format!(
            "core:\n  kind: kafka\n  kafka:\n    bootstrap_servers: {}\n    linger_ms: 1\n    partitions: 2\n",
            self.bootstrap()
        )
    }

    /// Stop the broker (SIGTERM: a controlled shutdown, then SIGKILL after 30 s); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = spawn(&self.dir, self.port);
        wait_ready(&self.dir, self.port, &mut child);
        self.child = Some(child);
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The broker shared by all tests of this binary, started on first use by a thread that
/// lives as long as the process (so the broker dies with the test process).
pub fn shared() -> &'static KafkaBroker {
    static SHARED: OnceLock<KafkaBroker> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let tmp = tempfile::tempdir().expect("temp dir");
            let dir = tmp.path().to_path_buf();
            let port = free_port();
            let mut child = spawn(&dir, port);
            wait_ready(&dir, port, &mut child);
            let _ = tx.send((port, dir));
            let _keep = (tmp, child);
            loop {
                std::thread::park();
            }
        });
        let (port, dir) = rx.recv().expect("shared broker started");
        KafkaBroker { port, dir, child: None, _tmp: None }
    })
}

/// A broker of one test's own that the test stops and starts again from async code: the
/// broker lives on a thread of its own (the JVM dies with the thread that spawned it, so not a
/// blocking-pool thread) and the calls wait for the command to be done without blocking the
/// runtime.
pub struct OwnedBroker {
    handle: KafkaBroker,
    commands: std::sync::mpsc::Sender<(bool, tokio::sync::oneshot::Sender<()>)>,
}

impl OwnedBroker {
    pub fn start() -> OwnedBroker {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (commands, rx) = std::sync::mpsc::channel::<(bool, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            let mut broker = KafkaBroker::start();
            let _ = ready_tx.send(broker.clone_handle());
            // `true`: stop; `false`: start again. The broker stops when the test drops `self`.
            while let Ok((stop, done)) = rx.recv() {
                if stop {
                    broker.stop();
                } else {
                    broker.restart();
                }
                let _ = done.send(());
            }
        });
        let handle = ready_rx.recv().expect("owned broker started");
        OwnedBroker { handle, commands }
    }

    pub fn broker(&self) -> &KafkaBroker {
        &self.handle
    }

    async fn command(&self, stop: bool) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send((stop, tx)).expect("broker thread alive");
        rx.await.expect("broker command done");
    }

    /// Stop the broker process (a controlled shutdown); its data stays.
    pub async fn stop(&self) {
        self.command(true).await;
    }

    /// Start it again on the same data and port; returns once it answers.
    pub async fn restart(&self) {
        self.command(false).await;
    }
}
