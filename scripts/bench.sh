#!/usr/bin/env bash
# Side-by-side benchmark of lmq-gateway (embedded core service) and Mosquitto with lmq-bench.
#
# Usage: scripts/bench.sh [FSYNC]       FSYNC = always (default) | interval | never
#
# Both brokers run at the same time on loopback, on different ports; every scenario runs
# against each in turn with the same lmq-bench command. When FSYNC is not `never`, a second
# gateway with `fsync: never` also runs the QoS 1 scenarios (Mosquitto does not write QoS 1
# messages to disk, so that column is the like-for-like comparison).
#
# Environment knobs (defaults in brackets):
#   DURATION [15]     seconds per throughput / latency run
#   IDLE_CONNS [15000] idle connections for the memory scenario
#   STORM_CONNS [5000] connections for the connect storm
#   FANOUT_SUBS [50]   subscribers for fan-out
#   GW_PORT [18831] GW_NEVER_PORT [18832] MOSQ_PORT [18833]
#   OUT [a new temp dir]  where JSON results, logs and the report go
#   SKIP_BUILD [0]    1 = use the binaries already built
#   CASES [all]       space-separated scenarios to run (idle storm storm-signed fanin-q0
#                     fanin-q1 lat-q0 lat-q1 fanout-q0 fanout-q1), e.g. for an A/B run of two
#                     builds; the report's other rows then show –
set -euo pipefail

FSYNC="${1:-always}"
case "$FSYNC" in always | interval | never) ;; *)
    echo "usage: $0 [always|interval|never]" >&2
    exit 64
    ;;
esac

DURATION="${DURATION:-15}"
IDLE_CONNS="${IDLE_CONNS:-15000}"
STORM_CONNS="${STORM_CONNS:-5000}"
FANOUT_SUBS="${FANOUT_SUBS:-50}"
GW_PORT="${GW_PORT:-18831}"
GW_NEVER_PORT="${GW_NEVER_PORT:-18832}"
MOSQ_PORT="${MOSQ_PORT:-18833}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d -t lmq-bench.XXXXXX)"
OUT="${OUT:-$WORK/results}"
mkdir -p "$OUT"

for tool in jq mosquitto; do
    command -v "$tool" > /dev/null || {
        echo "$tool is required (apt-get install -y jq mosquitto)" >&2
        exit 69
    }
done

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2> /dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2> /dev/null || true
    done
    rm -rf "$WORK/gw-data" "$WORK/gw-never-data"
}
trap cleanup EXIT INT TERM

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --workspace --bins)
fi
GW="$TARGET/release/lmq-gateway"
BENCH="$TARGET/release/lmq-bench"

# ---- servers ------------------------------------------------------------------------------
gateway_config() { # port fsync data_dir
    cat << EOF
listeners:
  - name: tcp
    bind: 127.0.0.1:$1
    transport: tcp
    max_connections: 100000
topics:
  parents:
    - name: "*"
      partitions: 4
core:
  kind: embedded
  embedded:
    data_dir: $3
    fsync: $2
auth:
  # The load generator connects anonymously, except in the signed connect storm
  # (LMQ signature authentication: one HMAC-SHA1 per CONNECT).
  allow_anonymous: true
  allow_plain_client_ids: true
  access_keys:
    - id: bench-key
      secret: bench-secret
      publish: ["#"]
      subscribe: ["#"]
log:
  level: warn
EOF
}

wait_port() { # port
    for _ in $(seq 1 100); do
        if (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

start_gateway() { # name port fsync -> sets LAST_PID
    gateway_config "$2" "$3" "$WORK/$1-data" > "$WORK/$1.yaml"
    "$GW" serve -c "$WORK/$1.yaml" > "$WORK/$1.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    wait_port "$2"
}

cat > "$WORK/mosquitto.conf" << EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_inflight_messages 64
max_queued_messages 100000
persistence false
log_dest stderr
EOF

start_gateway gw "$GW_PORT" "$FSYNC"
GW_PID=$LAST_PID
GW_NEVER_PID=""
if [[ "$FSYNC" != never ]]; then
    start_gateway gw-never "$GW_NEVER_PORT" never
    GW_NEVER_PID=$LAST_PID
fi
mosquitto -c "$WORK/mosquitto.conf" 2> "$WORK/mosquitto.log" &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_port "$MOSQ_PORT"
echo "gateway pid $GW_PID (fsync=$FSYNC, :$GW_PORT), ${GW_NEVER_PID:+gateway pid $GW_NEVER_PID (fsync=never, :$GW_NEVER_PORT), }mosquitto pid $MOSQ_PID (:$MOSQ_PORT); results in $OUT" >&2

# ---- scenarios ----------------------------------------------------------------------------
# Every scenario runs against the gateway and Mosquitto (each_server), the QoS 1 ones and the
# QoS 0 latency also against the fsync=never gateway (with_never); the signed connect storm runs
# against the gateway only and is compared with Mosquitto's anonymous storm.
# run_case CASE SERVER PORT PID lmq-bench-args...  -> $OUT/CASE.SERVER.json (+ .cpu pidstat log)
run_case() {
    local case=$1 server=$2 port=$3 pid=$4
    shift 4
    if [[ -n "${CASES:-}" ]] && [[ " $CASES " != *" $case "* ]]; then
        return 0
    fi
    local file="$OUT/$case.$server.json"
    echo "== $case on $server: lmq-bench $* --port $port" >&2
    echo "$BENCH $* --port $port --server-pid $pid --json" >> "$OUT/commands.txt"
    local stat_pid=""
    if command -v pidstat > /dev/null; then
        pidstat -u -p "$pid" 1 > "$OUT/$case.$server.pidstat" 2>&1 &
        stat_pid=$!
    fi
    local rc=0
    echo "$case $server start: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    "$BENCH" "$@" --port "$port" --server-pid "$pid" --json > "$file" 2> "$OUT/$case.$server.err" || rc=$?
    echo "$case $server end:   $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    [[ -n "$stat_pid" ]] && kill "$stat_pid" 2> /dev/null && wait "$stat_pid" 2> /dev/null || true
    if [[ ! -s "$file" ]]; then
        echo "   failed (exit $rc): $(head -c 300 "$OUT/$case.$server.err")" >&2
        echo '{}' > "$file"
    elif [[ $rc != 0 ]]; then
        echo "   completed with errors: $(jq -c '.errors[:3]' "$file")" >&2
    fi
    if ! kill -0 "$pid" 2> /dev/null; then
        echo "   server $server (pid $pid) is gone" >&2
    fi
    sleep 2
}

# each_server CASE ARGS... : the same command against every server.
each_server() {
    local case=$1
    shift
    run_case "$case" gw "$GW_PORT" "$GW_PID" "$@"
    run_case "$case" mosq "$MOSQ_PORT" "$MOSQ_PID" "$@"
}
# with_never CASE ARGS... : also against the fsync=never gateway.
with_never() {
    each_server "$@"
    local case=$1
    shift
    if [[ -n "$GW_NEVER_PID" ]]; then
        run_case "$case" gw-never "$GW_NEVER_PORT" "$GW_NEVER_PID" "$@"
    fi
}

D="--duration $DURATION"
each_server idle idle --clients "$IDLE_CONNS" --concurrency 500 --duration 10
each_server storm connect-storm --clients "$STORM_CONNS" --concurrency 100
run_case storm-signed gw "$GW_PORT" "$GW_PID" connect-storm --clients "$STORM_CONNS" --concurrency 100 --sign bench-key:bench-secret
each_server fanin-q0 fan-in --clients 8 --payload 64 --qos 0 $D
with_never fanin-q1 fan-in --clients 8 --payload 64 --qos 1 --inflight 64 $D
with_never lat-q0 fan-in --clients 8 --payload 64 --qos 0 --rate 20000 $D
with_never lat-q1 fan-in --clients 8 --payload 64 --qos 1 --rate 20000 $D
each_server fanout-q0 fan-out --clients "$FANOUT_SUBS" --payload 64 --qos 0 $D
with_never fanout-q1 fan-out --clients "$FANOUT_SUBS" --payload 64 --qos 1 $D

# ---- report -------------------------------------------------------------------------------
get() { # case server jq-expr
    jq -r "($3) // \"–\" | if type == \"number\" then (. * 100 | round / 100) else . end" "$OUT/$1.$2.json" 2> /dev/null || echo "–"
}
ratio() { # a b
    awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f×", a / b; else printf "–" }'
}
row() { # label case jq-expr [noratio]
    local g m n rg rn=""
    g=$(get "$2" gw "$3")
    m=$(get "$2" mosq "$3")
    rg=$(ratio "$g" "$m")
    if [[ -n "$GW_NEVER_PID" ]] && [[ -s "$OUT/$2.gw-never.json" ]]; then
        n=$(get "$2" gw-never "$3")
        rn=$(ratio "$n" "$m")
    fi
    if [[ "${4:-}" == noratio ]]; then
        rg=""
        rn=""
    fi
    echo "| $1 | $g | $m | $rg | ${n:-} | $rn |"
}
{
    echo "| scenario (metric) | lmq-gateway fsync=$FSYNC | mosquitto | ratio lmq/mosq | lmq-gateway fsync=never | ratio |"
    echo "|---|---:|---:|---:|---:|---:|"
    row "QoS 0 fan-in 8→1, received msg/s" fanin-q0 '.messages.received_per_s'
    row "QoS 0 fan-in 8→1, lost (QoS 0 drops)" fanin-q0 '.messages.lost' noratio
    row "QoS 0 fan-in 8→1, server CPU %" fanin-q0 '.server.cpu_pct' noratio
    row "QoS 1 fan-in 8→1, received msg/s" fanin-q1 '.messages.received_per_s'
    row "QoS 1 fan-in 8→1, lost" fanin-q1 '.messages.lost' noratio
    row "QoS 1 fan-in 8→1, acked by server msg/s" fanin-q1 '.messages.sent_per_s'
    row "QoS 1 fan-in 8→1, out-of-order deliveries" fanin-q1 '.messages.out_of_order' noratio
    row "QoS 1 fan-in 8→1, server CPU %" fanin-q1 '.server.cpu_pct' noratio
    row "QoS 0 @ 20k msg/s, p50 µs" lat-q0 '.messages.latency_us.p50'
    row "QoS 0 @ 20k msg/s, p99 µs" lat-q0 '.messages.latency_us.p99'
    row "QoS 0 @ 20k msg/s, p99.9 µs" lat-q0 '.messages.latency_us.p999'
    row "QoS 1 @ 20k msg/s, p50 µs" lat-q1 '.messages.latency_us.p50'
    row "QoS 1 @ 20k msg/s, p99 µs" lat-q1 '.messages.latency_us.p99'
    row "QoS 1 @ 20k msg/s, p99.9 µs" lat-q1 '.messages.latency_us.p999'
    row "QoS 1 @ 20k msg/s, received msg/s" lat-q1 '.messages.received_per_s'
    row "QoS 0 fan-out 1→$FANOUT_SUBS, deliveries/s" fanout-q0 '.messages.received_per_s'
    row "QoS 0 fan-out 1→$FANOUT_SUBS, lost" fanout-q0 '.messages.lost' noratio
    row "QoS 1 fan-out 1→$FANOUT_SUBS, deliveries/s" fanout-q1 '.messages.received_per_s'
    row "QoS 1 fan-out 1→$FANOUT_SUBS, lost" fanout-q1 '.messages.lost' noratio
    row "idle: connections held (of $IDLE_CONNS)" idle '.idle.connected' noratio
    row "idle: server RSS bytes / connection" idle '.idle.bytes_per_conn_after_hold'
    row "idle: server RSS MB at $IDLE_CONNS conns" idle '(.idle.rss_kb_after_hold // 0) / 1024'
    row "connect storm $STORM_CONNS: connects/s" storm '.storm.connects_per_s'
    row "connect storm: CONNACK p99 µs" storm '.storm.connack_latency_us.p99'
    # The gateway's signed storm against Mosquitto's anonymous one.
    g=$(get storm-signed gw '.storm.connects_per_s')
    m=$(get storm mosq '.storm.connects_per_s')
    echo "| connect storm $STORM_CONNS, gateway signed (HMAC) vs mosquitto anonymous: connects/s | $g | $m | $(ratio "$g" "$m") |  |  |"
} | tee "$OUT/table.md"
echo "results: $OUT" >&2
