//! The gateway binary in a child process, for what an in-process gateway cannot show: a
//! SIGKILL, a restart on the same data, the resident set size of the gateway alone.
//!
//! The caller gives the configuration after `listeners:` (core service, auth, mqtt, ...); the
//! launcher adds the TCP listener (and the admin API when asked for), writes `gateway.yaml`
//! into the process's directory, runs `lmq-gateway serve` there with its output appended to
//! `gateway.log`, and returns once the listener accepts connections.

use super::{http, metric_value, ADMIN_TOKEN};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to listen before the start fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr")
}

/// How to start a [`GatewayProcess`]: [`GatewayProcess::options`], then the setters, then
/// [`ProcessOptions::start`].
pub struct ProcessOptions {
    yaml: String,
    addr: Option<SocketAddr>,
    dir: Option<PathBuf>,
    admin: bool,
    env: Vec<(String, String)>,
}

impl ProcessOptions {
    /// Listen on `addr` (to restart on the same port) instead of a free port.
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// Run in `dir` (config, log, relative data paths), kept by the caller across restarts,
    /// instead of a fresh temporary directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Enable the admin API on a free port with token [`ADMIN_TOKEN`] (for
    /// [`GatewayProcess::metric`]).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Set an environment variable of the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Spawn the process and wait until it listens; panics (showing its log) if it does not
    /// within 30 s or exits before.
    pub fn start(self) -> GatewayProcess {
        let (dir, tmp) = match self.dir {
            Some(d) => (d, None),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                (t.path().to_path_buf(), Some(t))
            }
        };
        let addr = self.addr.unwrap_or_else(free_addr);
        let admin = self.admin.then(free_addr);
        let admin_yaml =
            admin.map_or(String::new(), |a| format!("admin:\n  enabled: true\n  bind: {a}\n  token: {ADMIN_TOKEN}\n"));
        let config = dir.join("gateway.yaml");
        let yaml = format!("listeners:\n  - name: tcp\n    bind: {addr}\n{admin_yaml}{}", self.yaml);
        std::fs::write(&config, yaml).expect("write gateway.yaml");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gateway.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .current_dir(&dir)
            .envs(self.env)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn gateway");
        let mut p = GatewayProcess { child, addr, admin, dir, _tmp: tmp };
        p.wait_listening();
        p
    }
}

/// A running gateway process; killed (SIGKILL) when dropped, its log printed if the test is
/// failing.
pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    admin: Option<SocketAddr>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl GatewayProcess {
    /// Options for a process with `yaml` after its `listeners:` section.
    pub fn options(yaml: &str) -> ProcessOptions {
        ProcessOptions { yaml: yaml.to_owned(), addr: None, dir: None, admin: false, env: Vec::new() }
    }

    /// A process with `yaml` after its `listeners:` section, on a free port in a fresh
    /// directory.
    pub fn start(yaml: &str) -> GatewayProcess {
        Self::options(yaml).start()
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(self.addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("gateway exited ({status}) before listening on {}; log:\n{}", self.addr, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not listen on {} within 30 s; log:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's directory (config, log, relative data paths).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin API's address, when started with it.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// Resident set size of the process, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid()).expect("VmRSS of the gateway process")
    }

    /// Sum of the samples of metric `name` whose labels include `labels`, from the admin API.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let admin = self.admin.expect("started with the admin API");
        let text = http()
            .get(format!("http://{admin}/metrics"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        metric_value(&text, name, labels)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident set size of process `pid` in bytes, from `/proc/<pid>/status`.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            eprintln!("---- log of the gateway on {} ----\n{}", self.addr, self.log());
        }
    }
}
