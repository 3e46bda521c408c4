#!/usr/bin/env bash
# Cost of message trace on the hot path: QoS 1 fan-in (8 publishers → 1 subscriber, 64 in
# flight each) against three servers run at once on loopback — the gateway with tracing off,
# the gateway with every message traced (`trace.enabled: true`, `sample_rate: 1.0`: publish,
# stored, delivered and acked events for each message), and Mosquitto — in ROUNDS alternating
# rounds, each server in turn with the same lmq-bench command. Prints one line per run and the
# medians: received msg/s, acked-by-server msg/s, the ratios trace-on / trace-off and
# gateway / Mosquitto.
#
# Usage: scripts/bench-trace.sh      (DURATION [10] s per run, ROUNDS [3], SAMPLE [1.0]: trace.sample_rate, SKIP_BUILD [0])
set -euo pipefail
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
SAMPLE="${SAMPLE:-1.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d -t lmq-trace-bench.XXXXXX)"
for tool in jq mosquitto; do
    command -v "$tool" > /dev/null || { echo "$tool is required" >&2; exit 69; }
done
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --workspace --bins)
fi
GW="$TARGET/release/lmq-gateway"
BENCH="$TARGET/release/lmq-bench"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2> /dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

start_gateway() { # name port trace(true|false) -> LAST_PID
    cat > "$WORK/$1.yaml" << EOF
listeners:
  - name: tcp
    bind: 127.0.0.1:$2
topics:
  parents:
    - name: "*"
      partitions: 4
core:
  embedded:
    data_dir: $WORK/$1-data
    fsync: always
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
log:
  level: warn
trace:
  enabled: $3
  sample_rate: $SAMPLE
admin:
  enabled: true
  bind: 127.0.0.1:$(($2 + 10))
EOF
    "$GW" serve -c "$WORK/$1.yaml" > "$WORK/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_port "$2"
}

start_gateway off 18841 false
OFF_PID=$LAST_PID
start_gateway on 18842 true
ON_PID=$LAST_PID
cat > "$WORK/mosquitto.conf" << EOF
listener 18843 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_inflight_messages 64
max_queued_messages 100000
persistence false
EOF
mosquitto -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_port 18843

declare -A RECV ACKED
for round in $(seq 1 "$ROUNDS"); do
    for server in off on mosq; do
        case $server in off) port=18841 pid=$OFF_PID ;; on) port=18842 pid=$ON_PID ;; mosq) port=18843 pid=$MOSQ_PID ;; esac
        json=$("$BENCH" fan-in --clients 8 --payload 64 --qos 1 --inflight 64 --duration "$DURATION" \
            --port "$port" --server-pid "$pid" --json 2> "$WORK/err") || true
        r=$(jq -r '.messages.received_per_s // 0' <<< "$json")
        a=$(jq -r '.messages.sent_per_s // 0' <<< "$json")
        lost=$(jq -r '.messages.lost // "?"' <<< "$json")
        echo "round $round $server: received $r msg/s, acked $a msg/s, lost $lost"
        RECV[$server]+="$r "
        ACKED[$server]+="$a "
        sleep 2
    done
done
median() { tr ' ' '\n' <<< "$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }'; }
for what in RECV ACKED; do
    declare -n m=$what
    off=$(median "${m[off]}") on=$(median "${m[on]}") mosq=$(median "${m[mosq]}")
    label=$([[ $what == RECV ]] && echo "received" || echo "acked by server")
    echo "median $label msg/s: trace off $off, trace on $on ($(ratio "$on" "$off")× off), mosquitto $mosq (off $(ratio "$off" "$mosq")×, on $(ratio "$on" "$mosq")× mosquitto)"
done
dropped=$(curl -fsS "http://127.0.0.1:18852/metrics" | awk '/^lmq_trace_events_dropped_total/ {print $2}')
echo "trace events the traced gateway dropped (queue full or not stored): ${dropped:-?}"
