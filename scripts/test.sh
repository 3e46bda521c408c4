#!/usr/bin/env bash
# Run every test of lmq-gateway: unit, integration (real sockets, real MQTT clients), the
# end-to-end scripts with Debian's mosquitto_pub / mosquitto_sub (TCP and TLS) against the
# built binary, and the browser test (Debian's chromium, headless, driven by playwright-core);
# the Grafana dashboard's queries against Debian's prometheus scraping the gateway, and
# hadolint on the Dockerfile; the Kafka core service against tansu, a Kafka-protocol broker
# (scripts/kafka-dev.sh); the RocketMQ core service against a real RocketMQ name server and
# broker (scripts/rocketmq-dev.sh).
# Installs the Debian packages the tests drive when they are missing (needs root or sudo);
# npm installs only playwright-core (no browser download) into tests/browser/node_modules.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# Observability checks: prometheus-e2e.sh and hadolint.sh.
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Kafka tests: the tansu broker's sqlite database gets an index through sqlite3 (kafka-dev.sh).
command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3)
if ((${#missing[@]})); then
  echo "installing test tools: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Kafka-protocol test broker (tansu, ~/.cargo/bin): reused when present, built otherwise
# (15-35 minutes on 2 cores, once per machine). The Kafka tests start their own brokers.
scripts/kafka-dev.sh install
# RocketMQ core-service tests: a real name server + broker (installed once, reused), started by
# the test binaries themselves through scripts/rocketmq-dev.sh; required here, so never skipped.
scripts/rocketmq-dev.sh install
export LMQ_REQUIRE_ROCKETMQ=1

cargo build --bins
cargo test --no-fail-fast
BIN="${CARGO_TARGET_DIR:-target}/debug/lmq-gateway"
status=0
scripts/mosquitto-e2e.sh "$BIN" || status=1
scripts/tls-e2e.sh "$BIN" || status=1
scripts/browser-e2e.sh "$BIN" || status=1
scripts/prometheus-e2e.sh "$BIN" || status=1
scripts/hadolint.sh || status=1
exit $status
