//! Kafka-protocol brokers for tests: tansu started through `scripts/kafka-dev.sh run`, one
//! shared per test binary ([`shared`]) or owned by a test that stops and restarts it
//! ([`KafkaBroker::start`]). Each broker has its own port and data directory.
//!
//! tansu 0.6 deviates from Kafka in ways the script works around (header index, `.env`);
//! nothing here changes how the gateway talks to Kafka.

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

/// Spawn the broker; it is killed when the thread that spawned it ends (PR_SET_PDEATHSIG).
fn spawn(dir: &Path, port: u16) -> Child {
    spawn_advertising(dir, port, port)
}

fn spawn_advertising(dir: &Path, port: u16, advertised: u16) -> Child {
    let have_tansu = Command::new("sh")
        .args(["-c", "command -v tansu || test -x \"$HOME/.cargo/bin/tansu\""])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(have_tansu, "tansu is not installed: run `scripts/kafka-dev.sh install` (scripts/test.sh does)");
    let log = std::fs::File::create(dir.join("broker.log")).expect("broker log");
    let mut cmd = Command::new(script());
    cmd.arg("run")
        .arg(dir)
        .arg(port.to_string())
        .arg(advertised.to_string())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().expect("start tansu")
}

fn wait_ready(dir: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && dir.join("tansu.db.indexed").exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
    panic!("tansu on port {port} not ready within 60 s; log:\n{log}");
}

impl KafkaBroker {
    /// A broker owned by the caller, in a fresh directory. Must be created (and restarted)
    /// from a thread that outlives it — a `#[tokio::test]`'s own thread is fine.
    pub fn start() -> KafkaBroker {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let child = spawn(&dir, port);
        wait_ready(&dir, port);
        KafkaBroker { port, dir, child: Some(child), _tmp: Some(tmp) }
    }

    /// A handle with the same port and settings that does not own the process.
    pub fn clone_handle(&self) -> KafkaBroker {
        KafkaBroker { port: self.port, dir: self.dir.clone(), child: None, _tmp: None }
    }

    /// A broker reached through a [`Proxy`] that can black it out: clients (told the proxy's
    /// port by the broker's metadata) lose their connections and cannot reconnect until the
    /// blackout ends, as when a broker is down.
    ///
    /// Why not stop and restart tansu: tansu 0.6 cannot take back an idempotent producer
    /// after a restart — its storage panics in `idempotent_message_check` ("more or less than
    /// one row", tansu-storage-0.6.0/src/lite.rs:503) on the producer's next batch and every
    /// later request fails. Reproduction: an `enable.idempotence=true` rdkafka producer
    /// sends, `scripts/kafka-dev.sh stop` + `start` on the same directory, the producer sends
    /// again. Apache Kafka keeps producer state across restarts; the gateway needs no change.
    pub fn start_behind_proxy() -> (KafkaBroker, Proxy) {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let proxy = Proxy::start(port);
        let child = spawn_advertising(&dir, port, proxy.port);
        wait_ready(&dir, port);
        (KafkaBroker { port: proxy.port, dir, child: Some(child), _tmp: Some(tmp) }, proxy)
    }

    pub fn bootstrap(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// Client settings for tests: short fetch waits (tansu waits `fetch.wait.max.ms` even
    /// when records are there) and small batches.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: self.bootstrap(),
            fetch_wait_max_ms: 10,
            linger_ms: 1,
            partitions: 2,
            ..KafkaConfig::default()
        }
    }

    /// The `core:` section of a gateway.yaml for this broker.
    pub fn core_yaml(&self) -> String {
        format!(
            "core:\n  kind: kafka\n  kafka:\n    bootstrap_servers: {}\n    fetch_wait_max_ms: 10\n    linger_ms: 1\n    partitions: 2\n",
            self.bootstrap()
        )
    }

    /// Stop the broker (SIGTERM, then SIGKILL after 10 s); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
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
        self.child = Some(spawn(&self.dir, self.port));
        wait_ready(&self.dir, self.port);
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
            let child = spawn(&dir, port);
            wait_ready(&dir, port);
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

/// A TCP proxy in front of a broker that can cut every connection and refuse new ones.
pub struct Proxy {
    pub port: u16,
    blackout: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let (blackout, rx) = tokio::sync::watch::channel(false);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("proxy listener");
                loop {
                    let Ok((mut down, _)) = listener.accept().await else { continue };
                    if *rx.borrow() {
                        drop(down);
                        continue;
                    }
                    let mut rx = rx.clone();
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = rx.wait_for(|b| *b) => {}
                        }
                    });
                }
            });
        });
        Proxy { port, blackout }
    }

    /// Cut all connections and refuse new ones (`true`), or let them through again.
    pub fn set_blackout(&self, on: bool) {
        let _ = self.blackout.send(on);
    }
}
