#!/usr/bin/env bash
# End-to-end check of the Grafana dashboard against a real Prometheus: Debian's `prometheus`
# scrapes the built gateway's admin port every second (without a token, as
# deploy/prometheus.yml does). Every PromQL expression of grafana/dashboards/lmq-gateway.json
# is run through Prometheus' HTTP API twice, and each must return at least one series both
# times: right after start, before any client has connected (so every panel shows data at
# once; only the top-sessions panels may be empty then, as no session has a backlog), and after
# mosquitto clients have driven traffic, with a persistent subscriber offline so that the
# gateway has a backlog (the backlog panels must then show it, not just zeros).
# Needs: prometheus, mosquitto-clients, jq, curl, openssl (scripts/test.sh installs them).
# Prints "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/lmq-gateway}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }
for tool in prometheus mosquitto_pub jq curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool not found (scripts/test.sh installs it)"; exit 2; }
done
DASHBOARD=grafana/dashboards/lmq-gateway.json

WORK=$(mktemp -d)
# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
read -r PORT ADMIN PROM < <(free_ports 3)
cat > "$WORK/gateway.yaml" <<YAML
listeners:
  - name: tcp
    bind: 127.0.0.1:$PORT
core:
  embedded:
    data_dir: $WORK/data
auth:
  instance_id: e2e
  allow_plain_client_ids: true
  access_keys:
    - id: e2e-key
      secret: e2e-secret
      publish: ["e2e/#"]
      subscribe: ["e2e/#"]
topics:
  parents:
    - name: e2e
admin:
  enabled: true
  bind: 127.0.0.1:$ADMIN
backlog:
  interval_secs: 1
log:
  level: warn
YAML
cat > "$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: lmq-gateway
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
YAML

"$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM" >"$WORK/prometheus.log" 2>&1 &
PR=$!
cleanup() {
  kill "$GW" "$PR" 2>/dev/null; wait "$GW" "$PR" 2>/dev/null
  jobs -p | xargs -r kill 2>/dev/null; rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
wait_port "$PORT" || { echo "gateway did not start"; cat "$WORK/gateway.log"; exit 1; }
wait_port "$PROM" || { echo "prometheus did not start"; cat "$WORK/prometheus.log"; exit 1; }

query() { curl -sf --get "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode "query=$1"; }
# Prometheus scrapes the gateway (no token: /metrics is open).
for _ in $(seq 1 60); do
  [ "$(query 'up{job="lmq-gateway"}' | jq -r '.data.result[0].value[1] // empty')" = 1 ] && break
  sleep 0.5
done

pass=0; fail=0
# Every dashboard expression must return series; $1 names the moment, $2 (optional) matches
# expressions that may return none at that moment.
check_dashboard() {
  local expr q answer n
  while IFS= read -r expr; do
    # Grafana's rate interval, as the dashboard would resolve it for a short range.
    q=${expr//\$__rate_interval/1m}
    answer=$(query "$q")
    n=$(jq -r 'if .status == "success" then (.data.result | length) else -1 end' <<<"$answer" 2>/dev/null || echo -1)
    if [ "${n:--1}" -gt 0 ]; then pass=$((pass+1)); echo "ok   $1: $expr ($n series)";
    elif [ -n "${2:-}" ] && [ "${n:--1}" -eq 0 ] && [[ $expr == *$2* ]]; then pass=$((pass+1)); echo "ok   $1: $expr (none yet)";
    else fail=$((fail+1)); echo "FAIL $1: $expr: ${answer:-no answer}"; fi
  done < <(jq -r '.panels[].targets[].expr' "$DASHBOARD")
}

# The largest value a dashboard expression returns must be above $2 (the backlog is shown).
check_above() {
  local expr answer v
  expr=$(jq -r --arg t "$1" '.panels[] | select(.title == $t) | .targets[0].expr' "$DASHBOARD")
  answer=$(query "max($expr)")
  v=$(jq -r '.data.result[0].value[1] // "none"' <<<"$answer" 2>/dev/null || echo none)
  if [ "$v" != none ] && awk -v v="$v" -v min="$2" 'BEGIN { exit !(v > min) }'; then
    pass=$((pass+1)); echo "ok   panel \"$1\" shows $v (> $2)"
  else fail=$((fail+1)); echo "FAIL panel \"$1\": max($expr) = $v, expected > $2"; fi
}

# Right after start, before any client connects: a few scrapes, so rate() has two samples.
sleep 3
check_dashboard "before traffic" lmq_session_backlog

H=(-h 127.0.0.1 -p "$PORT")
pw() { printf '%s' "$1" | openssl dgst -sha1 -hmac e2e-secret -binary | base64; }
as() { C=("${H[@]}" -i "$1" -u 'Signature|e2e-key|e2e' -P "$(pw "$1")"); }

# Traffic: a subscriber that stays connected, a persistent one that subscribes and leaves (its
# messages pile up: the backlog), publishers at QoS 0/1/2, a refused login.
as e2e-prom-sub; mosquitto_sub "${C[@]}" -q 2 -t 'e2e/#' >/dev/null &
as e2e-prom-offline; mosquitto_sub "${C[@]}" -c -q 1 -t 'e2e/#' -E >/dev/null
sleep 0.5
mosquitto_pub "${H[@]}" -i e2e-bad -u 'Signature|e2e-key|e2e' -P wrong -t e2e/x -m no >/dev/null 2>&1
end=$((SECONDS + 8))
while [ $SECONDS -lt $end ]; do
  for q in 0 1 2; do as "e2e-prom-pub-$q"; mosquitto_pub "${C[@]}" -q "$q" -t "e2e/t$q" -m "m$q"; done
  as e2e-prom-ret; mosquitto_pub "${C[@]}" -q 1 -r -t e2e/retained -m kept
  sleep 0.2
done
sleep 3   # a few more scrapes after the last message

check_dashboard "with traffic"
check_above "Backlog per parent topic" 10
check_above "Top sessions by backlog" 10
# The oldest message waits since the first publish, at least the length of the traffic loop.
check_above "Delay per parent topic" 5
check_above "Top sessions by delay" 5
[ $((pass + fail)) -gt 0 ] || { fail=1; echo "FAIL no expressions found in $DASHBOARD"; }

echo "prometheus-e2e: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
