#!/usr/bin/env bash
# Operator console end-to-end test: headless Chromium (Debian's package, never a downloaded
# build) driven by playwright-core (npm, tests/browser/node_modules) against the built gateway
# with an admin token and a TCP listener, traffic made with Debian's mosquitto_sub /
# mosquitto_pub. The page at GET /ui on the admin port signs in with the token (a wrong one
# shows the 401), lists and kicks a connected client, shows a stored session's backlog, resets
# it (latest, earliest, a point in time) and deletes it, queries messages by topic page by page
# and by time, looks one up by msgId and shows its trace as a timeline (every message is traced).
# Details in tests/browser/ops-console.mjs.
# Screenshots are kept in ${ARTIFACTS:-target/artifacts}/ops-*.png. Prints "N passed, N failed".
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
read -r TCP_PORT ADMIN_PORT < <(free_ports 2)
export TCP_PORT ADMIN_PORT
export ADMIN_TOKEN=ops-console-$RANDOM$RANDOM
cat > "$WORK/gateway.yaml" <<YAML
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
listeners:
  - name: tcp
    bind: 127.0.0.1:$TCP_PORT
core:
  embedded:
    data_dir: $WORK/data
admin:
  enabled: true
  bind: 127.0.0.1:$ADMIN_PORT
trace:
  enabled: true
  sample_rate: 1.0
backlog:
  interval_secs: 1
log:
  level: warn
YAML

env -u LMQ_CONFIG -u LMQ_ADMIN_BIND LMQ_ADMIN_TOKEN="$ADMIN_TOKEN" \
  "$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
cleanup() { kill "$GW" 2>/dev/null; wait "$GW" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
for p in "$TCP_PORT" "$ADMIN_PORT"; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

timeout 240 node tests/browser/ops-console.mjs "$ARTIFACTS"
rc=$?
[ $rc -eq 0 ] || { echo "--- gateway log"; cat "$WORK/gateway.log"; }
exit $rc
