#!/usr/bin/env bash
# Browser end-to-end test: headless Chromium (Debian's package, never a downloaded build) driven
# by playwright-core (npm, installed into tests/browser/node_modules) against two built gateways:
#  - an open one (anonymous access) with ws and a wss listener using a self-signed certificate
#    made at start: /console connects with MQTT.js over ws:// and wss://, receives a message
#    from mosquitto_pub and publishes one that mosquitto_sub receives;
#  - the repository's gateway.yaml itself (a copy with only its ports and data directory
#    changed; the demo key's secret from LMQ_ACCESS_KEY_DEMO_KEY_SECRET, no admin token):
#    /console and /metrics answer as after the README's run command, the page signs in with
#    the demo key (signature computed in the page with Web Crypto, compared with openssl's) and
#    shows a message mosquitto_pub signed with openssl; a wrong secret is refused; on a
#    non-secure origin the page says why it cannot sign.
# Screenshots are kept in ${ARTIFACTS:-target/artifacts}/console.png, console-wss.png,
# console-signed.png and console-non-secure.png. Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/lmq-gateway}
ARTIFACTS=${ARTIFACTS:-$PWD/target/artifacts}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }
BIN=$(realpath "$BIN")
[ -x /usr/bin/chromium ] || { echo "/usr/bin/chromium missing (apt-get install chromium)"; exit 2; }
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  # Only the driver; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD keeps npm from fetching a browser.
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error) || exit 2
fi

WORK=$(mktemp -d)
# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
read -r PORT WS WSS SHIPPED_TCP SHIPPED_WS SHIPPED_ADMIN < <(free_ports 6)
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
      self_signed: true
core:
  embedded:
    data_dir: $WORK/data
log:
  level: warn
YAML

# The shipped gateway.yaml, on free loopback ports, with its data in $WORK.
export SHIPPED_TCP SHIPPED_WS SHIPPED_ADMIN
mkdir -p "$WORK/shipped"
sed -e "s|0\.0\.0\.0:1883|127.0.0.1:$SHIPPED_TCP|" \
    -e "s|0\.0\.0\.0:8083|127.0.0.1:$SHIPPED_WS|" \
    -e "s|127\.0\.0\.1:8080|127.0.0.1:$SHIPPED_ADMIN|" \
    -e "s|data_dir: data |data_dir: $WORK/shipped/data |" \
    gateway.yaml >"$WORK/shipped/gateway.yaml"
for want in "127.0.0.1:$SHIPPED_TCP" "127.0.0.1:$SHIPPED_WS" "127.0.0.1:$SHIPPED_ADMIN" "$WORK/shipped/data"; do
  grep -q "$want" "$WORK/shipped/gateway.yaml" || { echo "gateway.yaml no longer has the line that became $want"; exit 2; }
done
export DEMO_SECRET=browser-e2e-$RANDOM$RANDOM
# Signature mode, computed by openssl: the publisher's password, and the one the page must compute.
sig() { printf '%s' "$1" | openssl dgst -sha1 -hmac "$DEMO_SECRET" -binary | base64; }
export DEMO_PUB_ID=GID_demo@@@browser-e2e-pub PAGE_ID=GID_console@@@browser-signed
export DEMO_PUB_PW=$(sig "$DEMO_PUB_ID") PAGE_PW=$(sig "$PAGE_ID")

"$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
# As the README runs it: `serve` in the directory holding gateway.yaml, no other option.
(cd "$WORK/shipped" && exec env -u LMQ_CONFIG -u LMQ_ADMIN_TOKEN -u LMQ_ADMIN_BIND \
  LMQ_ACCESS_KEY_DEMO_KEY_SECRET="$DEMO_SECRET" "$BIN" serve) >"$WORK/shipped.log" 2>&1 &
SHIPPED=$!
cleanup() { kill "$GW" "$SHIPPED" 2>/dev/null; wait "$GW" "$SHIPPED" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
for p in "$WSS" "$SHIPPED_WS" "$SHIPPED_ADMIN"; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

timeout 180 node tests/browser/console.mjs "$WS" "$WSS" "$PORT" "$ARTIFACTS"
rc=$?
[ $rc -eq 0 ] || { echo "--- gateway log"; cat "$WORK/gateway.log"; echo "--- shipped gateway.yaml log"; cat "$WORK/shipped.log"; }
exit $rc
