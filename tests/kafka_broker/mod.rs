//! Apache Kafka brokers for tests, started through `scripts/kafka-dev.sh run` (one KRaft
//! process, broker and controller): one shared per test binary ([`shared`]) or owned by a test
//! that stops and restarts it ([`KafkaBroker::start`]). Each broker has its own ports and data
//! directory, and dies with the thread that started it. A broker can sit behind a
//! [`FaultProxy`] that refuses chosen requests the way a broker does for a moment.

#![allow(dead_code)]

use lmq_gateway::config::KafkaConfig;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct KafkaBroker {
    pub port: u16,
    /// The port the broker names to its clients when it is not `port`: a proxy in front of it.
    advertised: Option<u16>,
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
fn spawn(dir: &Path, port: u16, advertised: Option<u16>) -> Child {
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
    if let Some(a) = advertised {
        cmd.env("KAFKA_ADVERTISED_PORT", a.to_string());
    }
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
        Self::start_behind(None)
    }

    /// A broker whose clients reach it through a proxy listening on `advertised`, when given.
    pub fn start_behind(advertised: Option<u16>) -> KafkaBroker {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let mut child = spawn(&dir, port, advertised);
        wait_ready(&dir, port, &mut child);
        KafkaBroker { port, advertised, dir, child: Some(child), _tmp: Some(tmp) }
    }

    /// A handle with the same port and settings that does not own the process.
    pub fn clone_handle(&self) -> KafkaBroker {
        KafkaBroker { port: self.port, advertised: self.advertised, dir: self.dir.clone(), child: None, _tmp: None }
    }

    pub fn bootstrap(&self) -> String {
        format!("localhost:{}", self.advertised.unwrap_or(self.port))
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
        let mut child = spawn(&self.dir, self.port, self.advertised);
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
            let mut child = spawn(&dir, port, None);
            wait_ready(&dir, port, &mut child);
            let _ = tx.send((port, dir));
            let _keep = (tmp, child);
            loop {
                std::thread::park();
            }
        });
        let (port, dir) = rx.recv().expect("shared broker started");
        KafkaBroker { port, advertised: None, dir, child: None, _tmp: None }
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
        Self::start_behind(None)
    }

    /// See [`KafkaBroker::start_behind`].
    pub fn start_behind(advertised: Option<u16>) -> OwnedBroker {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (commands, rx) = std::sync::mpsc::channel::<(bool, tokio::sync::oneshot::Sender<()>)>();
        std::thread::spawn(move || {
            let mut broker = KafkaBroker::start_behind(advertised);
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

/// A TCP proxy in front of a broker (started with [`OwnedBroker::start_behind`] its port):
/// forwards every request and response, except that it can refuse the first ProduceRequest
/// for one topic the way a broker refuses a request for a moment, with a retriable error —
/// as a broker does for a partition just created that it does not lead yet. The request's
/// record batch is corrupted, so the broker answers CORRUPT_MESSAGE (retriable, not stored),
/// and it is held back until the producer's next ProduceRequest for that topic is on its way
/// behind it (or [`REFUSED_HOLD`] has passed): the broker sees both, in order.
pub struct FaultProxy {
    pub port: u16,
    listener: Option<tokio::net::TcpListener>,
    /// The topic whose first ProduceRequest is refused; `None` once it was.
    refuse_first_produce_to: Arc<Mutex<Option<String>>>,
}

/// Longest the refused request is held back waiting for the next one.
const REFUSED_HOLD: Duration = Duration::from_secs(5);

impl FaultProxy {
    pub async fn bind() -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        FaultProxy { port, listener: Some(listener), refuse_first_produce_to: Arc::default() }
    }

    /// Refuse the first ProduceRequest that writes to `topic` alone.
    pub fn refuse_first_produce_to(&self, topic: &str) {
        *self.refuse_first_produce_to.lock().expect("lock") = Some(topic.to_owned());
    }

    /// Whether the request to refuse has come (and was refused).
    pub fn refused(&self) -> bool {
        self.refuse_first_produce_to.lock().expect("lock").is_none()
    }

    /// Start forwarding to the broker's own port.
    pub fn forward_to(&mut self, port: u16) {
        let listener = self.listener.take().expect("forwarding once");
        let refuse = self.refuse_first_produce_to.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refuse = refuse.clone();
                tokio::spawn(async move {
                    if let Ok(broker) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = relay(client, broker, refuse).await;
                    }
                });
            }
        });
    }
}

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One size-prefixed Kafka frame (without its size).
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let n = r.read_i32().await?;
    let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&i32::try_from(frame.len()).unwrap_or(i32::MAX).to_be_bytes());
    out.extend_from_slice(frame);
    w.write_all(&out).await
}

async fn relay(
    client: tokio::net::TcpStream,
    broker: tokio::net::TcpStream,
    refuse: Arc<Mutex<Option<String>>>,
) -> std::io::Result<()> {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let back = tokio::spawn(async move {
        while let Ok(frame) = read_frame(&mut from_broker).await {
            if write_frame(&mut to_client, &frame).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        loop {
            let mut frame = read_frame(&mut from_client).await?;
            let at = {
                let mut wanted = refuse.lock().expect("lock");
                let at = wanted.as_deref().and_then(|topic| sole_batch_end(&frame, topic));
                at.and_then(|at| Some((at, wanted.take()?)))
            };
            let Some((at, topic)) = at else {
                write_frame(&mut to_broker, &frame).await?;
                continue;
            };
            frame[at] ^= 0xff; // the batch's CRC no longer matches
            let mut held = vec![frame];
            let until = tokio::time::Instant::now() + REFUSED_HOLD;
            while let Ok(next) = tokio::time::timeout_at(until, read_frame(&mut from_client)).await {
                let next = next?;
                let produce = sole_batch_end(&next, &topic).is_some();
                held.push(next);
                if produce {
                    break;
                }
            }
            for frame in held {
                write_frame(&mut to_broker, &frame).await?;
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    }
    .await;
    back.abort();
    result
}

/// For a ProduceRequest (v3 and later) that writes one batch to one partition of `topic`:
/// the index of the batch's last byte.
fn sole_batch_end(frame: &[u8], topic: &str) -> Option<usize> {
    let mut r = Reader { buf: frame, at: 0 };
    let (api_key, version) = (r.i16()?, r.i16()?);
    if api_key != 0 || version < 3 {
        return None;
    }
    let flexible = version >= 9;
    r.skip(4)?; // correlation id
    let client_id = r.i16()?;
    r.skip(usize::try_from(client_id.max(0)).ok()?)?;
    if flexible {
        r.tags()?;
        let transactional_id = r.varint()?;
        r.skip(usize::try_from(transactional_id.saturating_sub(1)).ok()?)?;
    } else {
        let transactional_id = r.i16()?;
        r.skip(usize::try_from(transactional_id.max(0)).ok()?)?;
    }
    r.skip(6)?; // acks, timeout
    let topics = if flexible { r.varint()?.checked_sub(1)? } else { u64::try_from(r.i32()?).ok()? };
    let name_len = if flexible { r.varint()?.checked_sub(1)? } else { u64::try_from(r.i16()?).ok()? };
    let name = r.take(usize::try_from(name_len).ok()?)?;
    let partitions = if flexible { r.varint()?.checked_sub(1)? } else { u64::try_from(r.i32()?).ok()? };
    if topics != 1 || name != topic.as_bytes() || partitions != 1 {
        return None;
    }
    r.skip(4)?; // partition index
    let records = if flexible { r.varint()?.checked_sub(1)? } else { u64::try_from(r.i32()?).ok()? };
    let end = r.at.checked_add(usize::try_from(records).ok()?)?;
    (records > 0 && end <= frame.len()).then_some(end - 1)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.take(1)?.first()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    /// Tagged fields: skipped.
    fn tags(&mut self) -> Option<()> {
        for _ in 0..self.varint()? {
            self.varint()?;
            let n = self.varint()?;
            self.skip(usize::try_from(n).ok()?)?;
        }
        Some(())
    }
}
