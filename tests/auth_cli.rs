//! The `sign` and `token issue` commands: run the built binary with a temporary config and
//! check that what it prints is accepted by the authenticator.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::sync::Arc;

use lmq_gateway::auth::{AuthMode, AuthRequest, Authenticator};
use lmq_gateway::backend::embedded::EmbeddedCore;
use lmq_gateway::backend::SharedCoreService;
use lmq_gateway::config::{Config, EmbeddedConfig, FsyncPolicy};

const CONFIG: &str = "
auth:
  instance_id: inst-9
  access_keys:
    - {id: cli-key, secret: cli-secret-1, publish: ['up/#'], subscribe: ['down/#']}
";

fn run(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
        .arg("--config")
        .arg(dir.join("gateway.yaml"))
        .args(args)
        .env_remove("LMQ_CONFIG")
        .env_remove("LMQ_SIGN_SECRET")
        .env_remove("LMQ_ACCESS_KEY_CLI_KEY_SECRET")
        .env_remove("LMQ_TOKEN_SIGNING_SECRET")
        .output()
        .expect("run lmq-gateway");
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

async fn authenticator(dir: &tempfile::TempDir) -> (SharedCoreService, Authenticator) {
    let config = Config::from_yaml(CONFIG).unwrap();
    let cfg =
        EmbeddedConfig { data_dir: dir.path().join("data"), fsync: FsyncPolicy::Never, ..EmbeddedConfig::default() };
    let core: Arc<EmbeddedCore> = EmbeddedCore::open(&cfg, "events").await.unwrap();
    let core: SharedCoreService = core;
    let auth = Authenticator::start(&config.auth, core.clone()).await.unwrap();
    (core, auth)
}

#[tokio::test]
async fn sign_output_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), CONFIG).unwrap();
    let (ok, out, err) = run(dir.path(), &["sign", "--client-id", "GID_cli@@@dev1"]);
    assert!(ok, "sign failed: {err}");
    let username = out.lines().find_map(|l| l.strip_prefix("username: ")).expect("username line");
    let password = out.lines().find_map(|l| l.strip_prefix("password: ")).expect("password line");
    assert_eq!(username, "Signature|cli-key|inst-9");

    let (core, auth) = authenticator(&dir).await;
    let req = |client_id| AuthRequest {
        client_id,
        username: Some(username),
        password: Some(password.as_bytes()),
        tls_client_cn: None,
    };
    let id = auth.authenticate(&req("GID_cli@@@dev1")).await.unwrap();
    assert_eq!(id.mode, AuthMode::Signature);
    assert!(id.check_publish("up/1").is_ok() && id.check_publish("down/1").is_err());
    assert!(auth.authenticate(&req("GID_cli@@@dev2")).await.is_err(), "bound to the ClientId it was made for");

    // --secret with another key id, and errors a newcomer can read.
    let (ok, out, _) =
        run(dir.path(), &["sign", "--client-id", "c", "--access-key-id", "x", "--secret", "s", "--instance-id", "i"]);
    assert!(ok && out.contains("username: Signature|x|i"), "{out}");
    let (ok, _, err) = run(dir.path(), &["sign", "--client-id", "c", "--access-key-id", "nope"]);
    assert!(!ok && err.contains("no access key `nope`"), "{err}");
    core.shutdown().await;
}

#[tokio::test]
async fn token_issue_output_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), CONFIG).unwrap();
    let (ok, out, err) = run(
        dir.path(),
        &[
            "token",
            "issue",
            "--access-key-id",
            "cli-key",
            "--resources",
            "up/#,down/+",
            "--actions",
            "W",
            "--ttl-secs",
            "600",
        ],
    );
    assert!(!ok, "down/+ is not publishable by cli-key: {out}");
    assert!(err.contains("may not publish `down/+`"), "{err}");

    let (ok, out, err) = run(
        dir.path(),
        &[
            "token",
            "issue",
            "--access-key-id",
            "cli-key",
            "--resources",
            "up/a,up/b/+",
            "--actions",
            "W",
            "--ttl-secs",
            "600",
        ],
    );
    assert!(ok, "token issue failed: {err}");
    assert!(err.contains("Token|cli-key|inst-9"), "{err}");
    let token = out.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");

    let (core, auth) = authenticator(&dir).await;
    let password = format!("W|{token}");
    let id = auth
        .authenticate(&AuthRequest {
            client_id: "GID_cli@@@dev1",
            username: Some("Token|cli-key|inst-9"),
            password: Some(password.as_bytes()),
            tls_client_cn: None,
        })
        .await
        .unwrap();
    assert_eq!(id.mode, AuthMode::Token);
    let grant = &id.tokens[0];
    let ttl_ms = grant.expire_ms - lmq_gateway::auth::now_ms();
    assert!((590_000..=600_000).contains(&ttl_ms), "{ttl_ms}");
    assert!(id.check_publish("up/b/1").is_ok() && id.check_publish("up/c").is_err());

    for bad_ttl in ["59", "2592001"] {
        let (ok, _, err) = run(
            dir.path(),
            &[
                "token",
                "issue",
                "--access-key-id",
                "cli-key",
                "--resources",
                "up/a",
                "--actions",
                "W",
                "--ttl-secs",
                bad_ttl,
            ],
        );
        assert!(!ok && err.contains("lifetime must be between 60 and 2592000"), "{err}");
    }
    core.shutdown().await;
}

/// The shipped demo secret on a listener other hosts can reach is named in a warning at start.
#[test]
fn serve_warns_about_demo_secrets_on_exposed_listeners() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listeners:\n  - name: tcp\n    bind: 0.0.0.0:0\ncore:\n  embedded:\n    data_dir: {}\n\
         auth:\n  instance_id: inst-9\n  access_keys:\n    - {{id: demo-key, secret: demo-secret-change-me, publish: ['#'], subscribe: ['#']}}\n\
         log:\n  level: info\n",
        dir.path().join("data").display()
    );
    std::fs::write(dir.path().join("gateway.yaml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
        .arg("--config")
        .arg(dir.path().join("gateway.yaml"))
        .arg("serve")
        .env_remove("LMQ_CONFIG")
        .env_remove("LMQ_ACCESS_KEY_DEMO_KEY_SECRET")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start lmq-gateway");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline && !out.contains("listening") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        // The warning comes right after the listeners are up.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = stdout.read(&mut buf).map(|n| out.push_str(&String::from_utf8_lossy(&buf[..n])));
        out
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
    let out = reader.join().unwrap();
    assert!(
        out.contains("shipped demo secret") && out.contains("demo-key"),
        "no warning about the demo secret in:\n{out}"
    );
}
