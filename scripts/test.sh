#!/usr/bin/env bash
# Run every check and test of lmq-gateway: formatting and clippy; unit and integration tests
# (real sockets, real MQTT clients); the core services against Apache Kafka 4.x (KRaft) and
# Apache RocketMQ 5.x, run from their jars on Maven Central (scripts/kafka-dev.sh,
# scripts/rocketmq-dev.sh; the test binaries start their own brokers); the end-to-end scripts
# with Debian's mosquitto_pub / mosquitto_sub (TCP and TLS) against the built binary; the
# browser test (Debian's chromium, headless, driven by playwright-core); the Grafana
# dashboard's queries against Debian's prometheus scraping the gateway; docker-compose.yml
# through Debian's `docker-compose config -q`; hadolint on the Dockerfile; the fuzz targets in
# fuzz/ for a bounded time (scripts/fuzz.sh, stable toolchain, no cargo-fuzz).
#
# Installs what the tests drive when it is missing (needs root or sudo): Debian packages
# (below), the broker jars (Maven, cached in ~/.cache/lmq-brokers and ~/.m2), playwright-core
# from npm into tests/browser/node_modules (no browser download). Prints the time of each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot run gains nothing from incremental compilation, which more than doubled the
# target directory's size (disk, not time, is what ran out on a CI machine).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

declare -a TIMES=()
stage() { # name command...
  local name=$1 t0=$SECONDS rc=0
  shift
  echo "=== $name"
  "$@" || rc=$?
  TIMES+=("$(printf '%-28s %4d s%s' "$name" $((SECONDS - t0)) "$([ $rc = 0 ] || echo "  FAILED ($rc)")")")
  return $rc
}
summary() {
  echo "=== stage times (s)"
  printf '%s\n' "${TIMES[@]}"
  echo "total $SECONDS s"
  df -h . | tail -1 | awk '{print "disk: " $3 " used, " $4 " free"}'
  du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | awk '{print "target directory: " $1}'
}
trap summary EXIT

install_packages() {
  local missing=()
  command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  # Observability checks: prometheus-e2e.sh and hadolint.sh.
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v jq >/dev/null 2>&1 || missing+=(jq)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  # The Kafka and RocketMQ brokers: Java and Maven (the jars come from Maven Central).
  command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  # docker-compose.yml is validated without a Docker engine.
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  # libfuzzer-sys compiles libFuzzer (C++) for scripts/fuzz.sh.
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  if ((${#missing[@]})); then
    echo "installing test tools: ${missing[*]}"
    local SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_brokers() {
  scripts/kafka-dev.sh install
  scripts/rocketmq-dev.sh install
}

stage "packages (apt)" install_packages
stage "brokers (maven)" install_brokers
stage "cargo fmt --check" cargo fmt --all --check
# The compose file needs the demo key's secret (no default); the admin token is optional, so
# it is checked with and without one.
compose_config() {
  env LMQ_ADMIN_TOKEN=ci LMQ_ACCESS_KEY_DEMO_KEY_SECRET=ci docker-compose config -q &&
    env -u LMQ_ADMIN_TOKEN LMQ_ACCESS_KEY_DEMO_KEY_SECRET=ci docker-compose config -q
}
stage "docker-compose config" compose_config
stage "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings

# The RocketMQ tests are required here, so never skipped.
export LMQ_REQUIRE_ROCKETMQ=1
stage "cargo build" cargo build --workspace --bins --tests --locked
status=0
stage "cargo test" cargo test --workspace --locked --no-fail-fast || status=1
# Every fuzz target for a bounded time (60 s each, two at a time on two cores).
stage "fuzz" scripts/fuzz.sh || status=1
BIN="${CARGO_TARGET_DIR:-target}/debug/lmq-gateway"
stage "mosquitto-e2e" scripts/mosquitto-e2e.sh "$BIN" || status=1
stage "mosquitto-mqtt-e2e" scripts/mosquitto-mqtt-e2e.sh "$BIN" || status=1
stage "tls-e2e" scripts/tls-e2e.sh "$BIN" || status=1
stage "browser-e2e" scripts/browser-e2e.sh "$BIN" || status=1
stage "ops-console-e2e" scripts/ops-console-e2e.sh "$BIN" || status=1
stage "prometheus-e2e" scripts/prometheus-e2e.sh "$BIN" || status=1
stage "alert rules" scripts/alerts-check.sh || status=1
stage "hadolint" scripts/hadolint.sh || status=1
exit $status
