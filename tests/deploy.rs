//! Static checks of the deployment files (no Docker engine needed): docker-compose.yml, the
//! compose gateway configuration, Prometheus and Grafana provisioning, the dashboard and the
//! Dockerfile agree with each other and with what the gateway really serves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use serde_yaml_ng::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(rel: &str) -> Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// `host[:ip]:container` port mappings of a compose service → (host port, container port).
fn ports(service: &Value) -> Vec<(u16, u16)> {
    seq(&service["ports"])
        .iter()
        .map(|p| {
            let parts: Vec<&str> = s(p).split(':').collect();
            let n = |x: &str| x.parse::<u16>().unwrap_or_else(|_| panic!("port `{x}` in {p:?}"));
            (n(parts[parts.len() - 2]), n(parts[parts.len() - 1]))
        })
        .collect()
}

/// Host paths mounted into a service: (host path, container path).
fn mounts(service: &Value) -> Vec<(String, String)> {
    seq(&service["volumes"])
        .iter()
        .filter_map(|v| {
            let mut it = s(v).split(':');
            let (host, container) = (it.next()?, it.next()?);
            host.starts_with("./").then(|| (host.to_string(), container.to_string()))
        })
        .collect()
}

/// The host file mounted at container path `path` (or under a mounted directory).
fn host_file(service: &Value, path: &str) -> Option<PathBuf> {
    mounts(service).into_iter().find_map(|(host, container)| {
        let rest = path.strip_prefix(&container)?;
        let host = root().join(host.trim_start_matches("./"));
        match rest.trim_start_matches('/') {
            "" => Some(host),
            _ if !rest.starts_with('/') => None,
            rest => Some(host.join(rest)),
        }
    })
}

#[test]
fn compose_services_files_and_ports_agree() {
    let compose = yaml("docker-compose.yml");
    let services = &compose["services"];
    for name in ["kafka", "gateway", "prometheus", "grafana"] {
        assert!(services.get(name).is_some(), "service `{name}` missing");
    }
    // Every file or directory a service mounts from the repository exists.
    for (name, svc) in services.as_mapping().unwrap() {
        for (host, _) in mounts(svc) {
            assert!(root().join(&host).exists(), "{}: {host} does not exist", s(name));
        }
    }

    // Kafka: the official image, one KRaft node, with a health check the gateway waits for.
    let kafka = &services["kafka"];
    assert!(s(&kafka["image"]).starts_with("apache/kafka:"), "official apache/kafka image");
    assert!(s(&kafka["environment"]["KAFKA_PROCESS_ROLES"]).contains("controller"), "KRaft, no ZooKeeper");
    assert!(kafka["healthcheck"]["test"].as_sequence().is_some_and(|t| !t.is_empty()));
    let gw = &services["gateway"];
    assert_eq!(s(&gw["depends_on"]["kafka"]["condition"]), "service_healthy");
    let dockerfile = s(&gw["build"]["dockerfile"]);
    assert!(root().join(s(&gw["build"]["context"])).join(dockerfile).is_file());

    // The gateway runs the mounted compose configuration.
    let config_path = s(&gw["environment"]["LMQ_CONFIG"]);
    let config_file = host_file(gw, config_path).expect("LMQ_CONFIG is a mounted file");
    assert_eq!(config_file, root().join("deploy/gateway-kafka.yaml"));
    let config = yaml("deploy/gateway-kafka.yaml");

    // The core service is the compose Kafka.
    assert_eq!(s(&config["core"]["kind"]), "kafka");
    let bootstrap = s(&config["core"]["kafka"]["bootstrap_servers"]);
    assert_eq!(bootstrap, "kafka:9092");
    let kafka_listeners = s(&kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]);
    assert!(kafka_listeners.contains(&format!("//{bootstrap}")), "{kafka_listeners}");

    // Published container ports = the listeners' ports + the admin port; all the SPEC's ports.
    let published: BTreeSet<u16> = ports(gw).iter().map(|(_, c)| *c).collect();
    let mut expected = BTreeSet::new();
    for l in seq(&config["listeners"]) {
        let bind: std::net::SocketAddr = s(&l["bind"]).parse().expect("listener bind");
        assert!(bind.ip().is_unspecified(), "listener {:?} must listen on all interfaces in a container", l["name"]);
        expected.insert(bind.port());
        if let Some(tls) = l.get("tls") {
            // `docker compose up` alone must work: the TLS listeners make their own certificate,
            // and the directory for real ones is mounted.
            assert_eq!(tls["self_signed"], Value::Bool(true), "listener {:?} needs no certificate files", l["name"]);
            assert!(tls.get("cert").is_none() && tls.get("key").is_none(), "{tls:?}");
            let certs = host_file(gw, "/etc/lmq-gateway/certs").expect("deploy/certs mounted for real certificates");
            assert!(certs.is_dir(), "{certs:?}");
        }
    }
    let tls_listeners =
        seq(&config["listeners"]).iter().filter(|l| matches!(s(&l["transport"]), "tls" | "wss")).count();
    assert_eq!(tls_listeners, 2, "TLS (8883) and WSS (8084) are on");
    assert_eq!(config["admin"]["enabled"], Value::Bool(true));
    let admin: std::net::SocketAddr = s(&config["admin"]["bind"]).parse().expect("admin bind");
    expected.insert(admin.port());
    assert_eq!(published, expected, "published ports differ from the gateway's listeners + admin");
    for port in [1883, 8883, 8083, 8084] {
        assert!(ports(gw).iter().any(|(h, _)| *h == port), "host port {port} published");
    }
    assert!(ports(&services["grafana"]).contains(&(3000, 3000)));
    // The admin API is published on the host's loopback only.
    let admin_mapping = seq(&gw["ports"]).iter().map(s).find(|p| p.ends_with(&format!(":{}", admin.port())));
    assert!(admin_mapping.is_some_and(|p| p.starts_with("127.0.0.1:")), "{admin_mapping:?}");

    // Prometheus scrapes the gateway's admin port; /metrics is open, so it needs no token and
    // runs the image's own command.
    let prom_svc = &services["prometheus"];
    let prom_file = host_file(prom_svc, "/etc/prometheus/prometheus.yml").expect("prometheus.yml mounted");
    let prom: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(prom_file).unwrap()).unwrap();
    let job = &seq(&prom["scrape_configs"])[0];
    assert_eq!(s(&job["metrics_path"]), "/metrics");
    let targets: Vec<&str> = seq(&seq(&job["static_configs"])[0]["targets"]).iter().map(s).collect();
    assert_eq!(targets, vec![format!("gateway:{}", admin.port())]);
    assert!(job.get("authorization").is_none() && job.get("bearer_token_file").is_none(), "{job:?}");
    assert!(prom_svc.get("entrypoint").is_none() && prom_svc.get("environment").is_none(), "{prom_svc:?}");
    // The admin token only switches the management API on: optional, empty when unset.
    assert_eq!(s(&config["admin"]["token_env"]), "LMQ_ADMIN_TOKEN");
    assert_eq!(s(&gw["environment"]["LMQ_ADMIN_TOKEN"]), "${LMQ_ADMIN_TOKEN:-}");
    assert!(s(&gw["environment"]["LMQ_ACCESS_KEY_DEMO_KEY_SECRET"]).starts_with("${LMQ_ACCESS_KEY_DEMO_KEY_SECRET:?"));

    // Grafana: datasource → the compose Prometheus; dashboards from the mounted directory.
    let graf = &services["grafana"];
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let ds = &seq(&ds["datasources"])[0];
    assert_eq!(s(&ds["url"]), "http://prometheus:9090");
    let provider = yaml("grafana/provisioning/dashboards/lmq-gateway.yml");
    let dash_dir = s(&seq(&provider["providers"])[0]["options"]["path"]);
    let host_dir = host_file(graf, dash_dir).expect("dashboards directory mounted");
    assert!(host_dir.join("lmq-gateway.json").is_file());
    assert!(host_file(graf, "/etc/grafana/provisioning/datasources/prometheus.yml").is_some_and(|p| p.is_file()));
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("grafana/dashboards/lmq-gateway.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let uid = s(&seq(&ds["datasources"])[0]["uid"]).to_string();
    let exported: BTreeSet<String> = lmq_gateway::metrics::Metrics::new().names().iter().cloned().collect();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut used = BTreeSet::new();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], uid.as_str(), "panel {}", p["title"]);
        let targets = p["targets"].as_array().filter(|t| !t.is_empty()).expect("panel has queries");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("lmq_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                let base = ["_bucket", "_count", "_sum"].iter().find_map(|sfx| n.strip_suffix(sfx)).unwrap_or(n);
                assert!(exported.contains(n) || exported.contains(base), "{n} in `{expr}` is not exported");
                used.insert(base.to_string());
            }
        }
    }
    // The panels: connections, connect rate, auth failures, messages, bytes, refusals,
    // drops, core-service latency and errors, lag; backlog and delay per parent topic and of the
    // top sessions.
    for m in [
        "lmq_connections",
        "lmq_connect_total",
        "lmq_auth_failures_total",
        "lmq_messages_total",
        "lmq_bytes_total",
        "lmq_limit_refusals_total",
        "lmq_dropped_qos0_messages_total",
        "lmq_core_append_duration_seconds",
        "lmq_core_append_errors_total",
        "lmq_consumer_lag_records",
        "lmq_backlog_messages",
        "lmq_backlog_delay_seconds",
        "lmq_session_backlog_messages",
        "lmq_session_backlog_delay_seconds",
    ] {
        assert!(used.contains(m), "dashboard does not show {m}");
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_healthcheck() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let froms: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS builder"), "{}", froms[0]);
    assert!(froms[1].starts_with("FROM debian:") && froms[1].contains("-slim"), "{}", froms[1]);
    let runtime_start = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap_or(0);
    let runtime = &lines[runtime_start..];
    let user = runtime.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("USER in the runtime stage");
    assert!(!["root", "0", "root:root", "0:0"].contains(&user), "runs as {user}");
    let health = runtime.iter().find(|l| l.starts_with("HEALTHCHECK ")).expect("HEALTHCHECK");
    assert!(health.contains("\"healthcheck\""), "{health}");
    let exposed: BTreeSet<&str> =
        runtime.iter().filter_map(|l| l.strip_prefix("EXPOSE ")).flat_map(|l| l.split_whitespace()).collect();
    for port in ["1883", "8883", "8083", "8084", "8080"] {
        assert!(exposed.contains(port), "EXPOSE {port}");
    }
    assert!(runtime.iter().any(|l| l.starts_with("COPY --from=builder")));
    // Every member of the cargo workspace is in the build stage: cargo reads their manifests
    // even to build the gateway alone.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = manifest.lines().find_map(|l| l.strip_prefix("members = ")).expect("a [workspace] members list");
    for member in members.trim_matches(['[', ']']).split(',').map(|m| m.trim().trim_matches('"')) {
        if member != "." {
            let copied = lines.iter().any(|l| l.starts_with(&format!("COPY {member} ")));
            assert!(copied, "the build stage does not copy workspace member {member}");
        }
    }
    // Everything the build stage copies exists.
    for l in lines.iter().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "COPY source {src} missing");
        }
    }
    // The default configuration of the image is the shipped one, and it is valid.
    lmq_gateway::config::Config::load(&root().join("gateway.yaml")).expect("gateway.yaml valid");
}

/// The compose file's gateway configuration is valid (the demo key's secret comes from the
/// environment in compose, as here), with an admin token and with the empty one compose passes
/// when none is set.
#[test]
fn compose_gateway_config_passes_check_config() {
    for admin_token in ["compose-token", ""] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
            .args(["check-config", "-c"])
            .arg(root().join("deploy/gateway-kafka.yaml"))
            .env("LMQ_ACCESS_KEY_DEMO_KEY_SECRET", "compose-secret")
            .env("LMQ_ADMIN_TOKEN", admin_token)
            .output()
            .expect("run check-config");
        assert!(out.status.success(), "check-config failed: {}", String::from_utf8_lossy(&out.stderr));
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains("kafka:9092"), "effective config names the compose Kafka: {shown}");
        assert!(shown.contains("self_signed: true"), "TLS listeners make their own certificate: {shown}");
    }
}

/// `deploy/gateway-mqtt.yaml`, the plain MQTT broker, passes `check-config` and says what it is.
#[test]
fn mqtt_broker_config_passes_check_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lmq-gateway"))
        .args(["check-config", "-c"])
        .arg(root().join("deploy/gateway-mqtt.yaml"))
        .output()
        .expect("run check-config");
    assert!(out.status.success(), "check-config failed: {}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    for setting in ["naming: mqtt", "allow_anonymous: true", "kind: embedded"] {
        assert!(shown.contains(setting), "effective config has `{setting}`: {shown}");
    }
}
