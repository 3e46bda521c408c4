#!/usr/bin/env bash
# Run every test of lmq-gateway: unit, integration (real sockets, real MQTT clients) and the
# end-to-end script with Debian's mosquitto_pub / mosquitto_sub against the built binary.
# Installs the Debian packages the tests drive when they are missing (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ((${#missing[@]})); then
  echo "installing test tools: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --bins
cargo test --no-fail-fast
scripts/mosquitto-e2e.sh "${CARGO_TARGET_DIR:-target}/debug/lmq-gateway"
