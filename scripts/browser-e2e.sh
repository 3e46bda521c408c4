#!/usr/bin/env bash
# Browser end-to-end test: the built gateway serves /console on a ws and a wss listener;
# headless Chromium (Debian's package, never a downloaded build) driven by playwright-core
# (npm, installed into tests/browser/node_modules) connects with MQTT.js, receives a message
# from mosquitto_pub and publishes one that mosquitto_sub receives. Screenshots are kept in
# ${ARTIFACTS:-target/artifacts}/console.png and console-wss.png. Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/lmq-gateway}
ARTIFACTS=${ARTIFACTS:-$PWD/target/artifacts}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }
[ -x /usr/bin/chromium ] || { echo "/usr/bin/chromium missing (apt-get install chromium)"; exit 2; }
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  # Only the driver; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD keeps npm from fetching a browser.
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) || exit 2
fi

WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); WS=$(free_port); WSS=$(free_port)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=lmq browser test" \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -keyout "$WORK/server.key" -out "$WORK/server.pem" 2>/dev/null
cat > "$WORK/gateway.yaml" <<YAML
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
listeners:
  - name: tcp
    bind: 127.0.0.1:$PORT
  - name: ws
    bind: 127.0.0.1:$WS
    transport: ws
  - name: wss
    bind: 127.0.0.1:$WSS
    transport: wss
    tls:
      cert: $WORK/server.pem
      key: $WORK/server.key
core:
  embedded:
    data_dir: $WORK/data
log:
  level: warn
YAML
"$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
cleanup() { kill "$GW" 2>/dev/null; wait "$GW" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$WSS) 2>/dev/null && break; sleep 0.1; done

timeout 120 node tests/browser/console.mjs "$WS" "$WSS" "$PORT" "$ARTIFACTS"
rc=$?
[ $rc -eq 0 ] || { echo "--- gateway log"; cat "$WORK/gateway.log"; }
exit $rc
