#!/usr/bin/env bash
# Run every test of lmq-gateway: unit, integration (real sockets, real MQTT clients), the
# end-to-end scripts with Debian's mosquitto_pub / mosquitto_sub (TCP and TLS) against the
# built binary, and the browser test (Debian's chromium, headless, driven by playwright-core).
# The RocketMQ tests run against a real RocketMQ name server and broker (scripts/rocketmq-dev.sh).
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
if ((${#missing[@]})); then
  echo "installing test tools: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
exit $status
