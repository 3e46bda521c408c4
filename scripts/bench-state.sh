#!/usr/bin/env bash
# Fleet-scale state on the Kafka core service: what a gateway (core.kind: kafka) costs at start
# and in memory when Kafka holds the state of a large fleet, and what persistent sessions write
# into the sessions topic under load.
#
# Usage: scripts/bench-state.sh [PART...]   PART = a | b   (default: a b)
#
#   a  A fresh Apache Kafka (scripts/kafka-dev.sh, data under a new temp dir, deleted at the
#      end). The gateway starts once on the empty broker (it creates its topics, compacted state
#      topics included); that start is measured as the "empty" column. Then `lmq-bench
#      state-fill` writes SESSIONS persistent sessions (SUBSCRIPTIONS filters each) and RETAINED
#      retained messages (64 B) into the state topics, and the gateway is measured twice, "first
#      start" and "restart" (a second start on the same state):
#        - process start → first successful MQTT CONNACK (a CONNECT attempt every 50 ms);
#        - VmRSS right after that CONNACK, and HOLD_SECS later (plus VmHWM); the gateway's CPU
#          time up to the CONNACK and its CPU % over the HOLD_SECS without clients;
#        - SUBSCRIBE → SUBACK of SUBACK_PROBES subscriptions, one after the other (filters that
#          match nothing: the cost of looking through the retained messages);
#        - `lmq-bench reconnect`: RECONNECT of the filled sessions (random, clean session 0),
#          RECONNECT_CONCURRENCY at a time: CONNECT → CONNACK p50/p99/max and session present.
#   b  On a fresh Kafka (no filled state; column "b" of the start figures) and gateway:
#      SUBSCRIBERS persistent subscribers (clean session 0, QoS 1) of one topic, one publisher
#      sending B_RATE msg/s (QoS 1), so each subscriber gets B_RATE msg/s with the least
#      publisher work, for B_SECS s: records written per second into the sessions topic (sum of
#      its partitions' end offsets before and after the publishing window) and the gateway's and
#      the broker's CPU over the window (utime+stime from /proc/PID/stat).
#
# The gateway: release build, parent topic `*` (4 partitions), anonymous clients,
# `limits.max_retained_messages` and `max_retained_bytes` raised (defaults 100 000 and 256 MiB)
# so that RETAINED retained messages fit, `log.level: warn`.
#
# Environment knobs (defaults in brackets):
#   SESSIONS [1000000]  RETAINED [1000000]  SUBSCRIPTIONS [2] per session
#   RECONNECT [1000] clients   RECONNECT_CONCURRENCY [50]   HOLD_SECS [30]   SUBACK_PROBES [20]
#   SUBSCRIBERS [10000]  B_RATE [10] msg/s per subscriber   B_SECS [60]
#   CHECKPOINT_MS [unset] mqtt.session_checkpoint_ms of the gateway, when set
#   STATE_CACHE [1] core.kafka.state_cache_dir in the run's temp dir: the restart finds the
#               first start's local copy of the sessions store; empty = unset (a new temporary
#               directory per start: every start reads the sessions topic from the beginning)
#   KAFKA_HEAP [1g]   GW_PORT [28851]   KAFKA_BENCH_PORT [29193]
#   OUT [a new temp dir]  JSON results, gateway and broker logs, commands, table.md
#   SKIP_BUILD [0] 1 = use the binaries already built
set -euo pipefail

PARTS=("$@")
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(a b)
SESSIONS="${SESSIONS:-1000000}"
RETAINED="${RETAINED:-1000000}"
SUBSCRIPTIONS="${SUBSCRIPTIONS:-2}"
RECONNECT="${RECONNECT:-1000}"
RECONNECT_CONCURRENCY="${RECONNECT_CONCURRENCY:-50}"
HOLD_SECS="${HOLD_SECS:-30}"
SUBACK_PROBES="${SUBACK_PROBES:-20}"
SUBSCRIBERS="${SUBSCRIBERS:-10000}"
B_RATE="${B_RATE:-10}"
B_SECS="${B_SECS:-60}"
CHECKPOINT_MS="${CHECKPOINT_MS:-}"
STATE_CACHE="${STATE_CACHE-1}"
GW_PORT="${GW_PORT:-28851}"
KAFKA_BENCH_PORT="${KAFKA_BENCH_PORT:-29193}"
export KAFKA_HEAP="${KAFKA_HEAP:-1g}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d -t lmq-bench-state.XXXXXX)"
OUT="${OUT:-$WORK/results}"
mkdir -p "$OUT"
export LC_ALL=C
BOOTSTRAP="localhost:$KAFKA_BENCH_PORT"

for tool in jq python3; do
    command -v "$tool" > /dev/null || {
        echo "$tool is required" >&2
        exit 69
    }
done

GW_PID=""
cleanup() {
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2> /dev/null && wait "$GW_PID" 2> /dev/null || true
    "$ROOT/scripts/kafka-dev.sh" stop "$WORK/kafka" > /dev/null 2>&1 || true
    [[ -f "$WORK/kafka/broker.log" ]] && cp "$WORK/kafka/broker.log" "$OUT/broker.log" 2> /dev/null
    rm -rf "$WORK/kafka" "$WORK/state-cache"
}
trap cleanup EXIT INT TERM

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --workspace --bins)
fi
GW="$TARGET/release/lmq-gateway"
BENCH="$TARGET/release/lmq-bench"

for port in "$GW_PORT" "$KAFKA_BENCH_PORT"; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
        echo "port $port is already in use (set GW_PORT / KAFKA_BENCH_PORT)" >&2
        exit 69
    fi
done

bench() { # lmq-bench args... (logged in commands.txt)
    echo "lmq-bench $*" >> "$OUT/commands.txt"
    "$BENCH" "$@"
}

cat > "$WORK/gw.yaml" << EOF
listeners:
  - name: tcp
    bind: 127.0.0.1:$GW_PORT
    transport: tcp
topics:
  parents:
    - name: "*"
      partitions: 4
core:
  kind: kafka
  kafka:
    bootstrap_servers: "$BOOTSTRAP"
    create_topics: true
${STATE_CACHE:+    state_cache_dir: $WORK/state-cache}
mqtt:
  retain_available: true
${CHECKPOINT_MS:+  session_checkpoint_ms: $CHECKPOINT_MS}
limits:
  # Defaults 100 000 and 256 MiB: raised so that every filled retained message fits.
  max_retained_messages: $((RETAINED + 100000))
  max_retained_bytes: 4294967296
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
log:
  level: warn
EOF
cp "$WORK/gw.yaml" "$OUT/gw.yaml"

# ---- the gateway --------------------------------------------------------------------------
# start_measured LABEL: start the gateway, time process start → first CONNACK, RSS then and
# HOLD_SECS later -> $OUT/start.LABEL.json; leaves GW_PID running.
start_measured() {
    local label=$1
    local t0
    t0=$(date +%s%N)
    "$GW" serve -c "$WORK/gw.yaml" >> "$OUT/gw.log" 2>&1 &
    GW_PID=$!
    echo "== $label: gateway pid $GW_PID" >&2
    # A CONNECT (3.1.1, clean session) every 50 ms until a CONNACK accepts it.
    local ms
    ms=$(python3 - "$GW_PORT" "$t0" "$GW_PID" << 'PY'
import os, socket, sys, time
port, t0, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cid = b"GID_probe@@@start"
var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
connect = bytes([0x10, len(var)]) + var
deadline = time.time() + 900
while time.time() < deadline:
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("the gateway exited")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(30)
            s.sendall(connect)
            ack = s.recv(4)
            if len(ack) == 4 and ack[0] == 0x20 and ack[3] == 0:
                print((time.time_ns() - t0) / 1e6)
                s.sendall(b"\xe0\x00")
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit("no CONNACK within 900 s")
PY
    ) || {
        echo "   the gateway did not answer: $(tail -5 "$OUT/gw.log")" >&2
        return 1
    }
    local rss0 rss1 hwm c0 c1
    rss0=$(awk '/^VmRSS:/ { print $2 }' "/proc/$GW_PID/status")
    c0=$(cpu_ticks "$GW_PID") # CPU of the start itself, up to the first CONNACK
    # Process start → SUBACK of a first SUBSCRIBE sent right after that CONNACK: a SUBSCRIBE
    # waits until the gateway's retained index is complete.
    local first_suback
    first_suback=$(python3 - "$GW_PORT" "$t0" << 'PY'
import socket, sys, time
port, t0 = int(sys.argv[1]), int(sys.argv[2])
cid = b"GID_probe@@@first-suback"
var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
s = socket.create_connection(("127.0.0.1", port), timeout=900)
s.sendall(bytes([0x10, len(var)]) + var)
assert s.recv(4)[3] == 0
f = b"probe/first/#"
body = (1).to_bytes(2, "big") + len(f).to_bytes(2, "big") + f + b"\x01"
s.sendall(bytes([0x82, len(body)]) + body)
ack = b""
while len(ack) < 5:
    ack += s.recv(5 - len(ack))
print((time.time_ns() - t0) / 1e6)
s.sendall(b"\xe0\x00")
PY
    ) || first_suback=null
    sleep "$HOLD_SECS"
    rss1=$(awk '/^VmRSS:/ { print $2 }' "/proc/$GW_PID/status")
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$GW_PID/status")
    c1=$(cpu_ticks "$GW_PID")
    # SUBSCRIBE → SUBACK: SUBACK_PROBES subscriptions one after the other on one connection
    # (filters that match no retained message: what a SUBSCRIBE costs with the retained store).
    local suback
    suback=$(python3 - "$GW_PORT" "$SUBACK_PROBES" << 'PY'
import socket, sys, time, json
port, n = int(sys.argv[1]), int(sys.argv[2])
cid = b"GID_probe@@@suback"
var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
s = socket.create_connection(("127.0.0.1", port), timeout=600)
s.sendall(bytes([0x10, len(var)]) + var)
assert s.recv(4)[3] == 0
took = []
for i in range(1, n + 1):
    f = f"probe/{i}/#".encode()
    body = i.to_bytes(2, "big") + len(f).to_bytes(2, "big") + f + b"\x01"
    t = time.monotonic()
    s.sendall(bytes([0x82, len(body)]) + body)
    ack = b""
    while len(ack) < 5:
        ack += s.recv(5 - len(ack))
    took.append((time.monotonic() - t) * 1000)
s.sendall(b"\xe0\x00")
took.sort()
print(json.dumps({"n": n, "p50_ms": took[len(took) // 2], "max_ms": took[-1]}))
PY
    ) || suback=null
    jq -n --arg run "$label" --argjson ms "$ms" --argjson first_suback "$first_suback" --argjson suback "$suback" --argjson rss0 "$rss0" --argjson rss1 "$rss1" --argjson hwm "$hwm" \
        --argjson hold "$HOLD_SECS" --argjson idle "$((c1 - c0))" --argjson start "$c0" --argjson tck "$(getconf CLK_TCK)" \
        '{run: $run, start_to_connack_ms: $ms, start_to_first_suback_ms: $first_suback, start_cpu_s: ($start / $tck), rss_kb_at_connack: $rss0,
          rss_kb_after_hold: $rss1, hwm_kb: $hwm, hold_s: $hold, hold_cpu_pct: ($idle / $tck / $hold * 100),
          suback: $suback}' \
        | tee "$OUT/start.$label.json" >&2
}

stop_gateway() {
    [[ -n "$GW_PID" ]] || return 0
    kill "$GW_PID" 2> /dev/null || true
    for _ in $(seq 300); do kill -0 "$GW_PID" 2> /dev/null || break; sleep 0.1; done
    kill -9 "$GW_PID" 2> /dev/null || true
    wait "$GW_PID" 2> /dev/null || true
    GW_PID=""
}

cpu_ticks() { # pid -> utime + stime (clock ticks)
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

sessions_end() {
    bench state-offsets --bootstrap "$BOOTSTRAP" --json | jq '.state_offsets["lmq-sessions"] // 0'
}

# ---- runs ---------------------------------------------------------------------------------
echo "$(date -u '+%F %T') start; nproc $(nproc); $(awk '/MemTotal/ { print $2 " kB" }' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
"$ROOT/scripts/kafka-dev.sh" start "$WORK/kafka" "$KAFKA_BENCH_PORT" >&2
BROKER_PID=$(cat "$WORK/kafka/pid")

# The empty broker: the gateway creates its topics (as it does in production) and is measured.
start_measured empty
stop_gateway
# The first start after the fill finds no local copy.
rm -rf "$WORK/state-cache"

part_a() {
    bench state-fill --bootstrap "$BOOTSTRAP" --sessions "$SESSIONS" --retained "$RETAINED" \
        --subscriptions "$SUBSCRIPTIONS" --json > "$OUT/fill.json"
    jq -c '.state_fill' "$OUT/fill.json" >&2
    du -sk "$WORK/kafka/data" | awk '{ print $1 }' > "$OUT/kafka-data-kb.txt"
    for label in first restart; do
        start_measured "$label"
        local rc=0
        bench reconnect --port "$GW_PORT" --sessions "$SESSIONS" --clients "$RECONNECT" \
            --concurrency "$RECONNECT_CONCURRENCY" --json > "$OUT/reconnect.$label.json" 2> "$OUT/reconnect.$label.err" || rc=$?
        [[ $rc == 0 ]] || echo "   reconnect exit $rc: $(jq -c '.errors[:3]' "$OUT/reconnect.$label.json" 2> /dev/null)" >&2
        jq -c '.reconnect' "$OUT/reconnect.$label.json" >&2 || true
        [[ $label == restart ]] || stop_gateway
    done
}

part_b() {
    # A fresh broker with no filled state: the sessions topic's end offsets then count only
    # the subscribers' checkpoints.
    stop_gateway
    "$ROOT/scripts/kafka-dev.sh" stop "$WORK/kafka" > /dev/null
    rm -rf "$WORK/kafka" "$WORK/state-cache"
    "$ROOT/scripts/kafka-dev.sh" start "$WORK/kafka" "$KAFKA_BENCH_PORT" >&2
    BROKER_PID=$(cat "$WORK/kafka/pid")
    start_measured b
    local ticks
    ticks=$(getconf CLK_TCK)
    # One publisher at B_RATE msg/s on one topic, SUBSCRIBERS persistent QoS 1 subscribers.
    echo "lmq-bench fan-out --persistent --qos 1 --clients $SUBSCRIBERS --rate $B_RATE --duration $B_SECS ..." >> "$OUT/commands.txt"
    "$BENCH" fan-out --persistent --qos 1 --clients "$SUBSCRIBERS" --rate "$B_RATE" --duration "$B_SECS" \
        --topic-prefix load --port "$GW_PORT" --server-pid "$GW_PID" --concurrency 200 --json \
        > "$OUT/b.json" 2> "$OUT/b.err" &
    local load=$!
    # The publishing window starts when lmq-bench says so (every subscriber connected).
    local started=0
    for _ in $(seq 12000); do
        grep -q "publishing starts" "$OUT/b.err" 2> /dev/null && started=1 && break
        kill -0 "$load" 2> /dev/null || break
        sleep 0.05
    done
    if [[ $started == 0 ]]; then
        wait "$load" || true
        echo "   part b did not start: $(head -c 300 "$OUT/b.err")" >&2
        return 0
    fi
    local e0 g0 k0 t0 e1 g1 k1 t1
    e0=$(sessions_end) g0=$(cpu_ticks "$GW_PID") k0=$(cpu_ticks "$BROKER_PID") t0=$(date +%s%N)
    sleep "$B_SECS"
    e1=$(sessions_end) g1=$(cpu_ticks "$GW_PID") k1=$(cpu_ticks "$BROKER_PID") t1=$(date +%s%N)
    local rc=0
    wait "$load" || rc=$?
    [[ $rc == 0 ]] || echo "   fan-out exit $rc: $(head -c 300 "$OUT/b.err")" >&2
    jq -n --argjson e0 "$e0" --argjson e1 "$e1" --argjson g "$((g1 - g0))" --argjson k "$((k1 - k0))" \
        --argjson ns "$((t1 - t0))" --argjson ticks "$ticks" --argjson subs "$SUBSCRIBERS" --argjson rate "$B_RATE" '
        ($ns / 1e9) as $s |
        {subscribers: $subs, rate_per_subscriber: $rate, window_s: $s,
         session_records: ($e1 - $e0), session_records_per_s: (($e1 - $e0) / $s),
         gateway_cpu_pct: ($g / $ticks / $s * 100), broker_cpu_pct: ($k / $ticks / $s * 100)}' \
        | tee "$OUT/b.state.json" >&2
}

for part in "${PARTS[@]}"; do
    case "$part" in
        a) part_a ;;
        b) part_b ;;
        *)
            echo "unknown part $part (a | b)" >&2
            exit 64
            ;;
    esac
done
stop_gateway

# ---- report -------------------------------------------------------------------------------
get() { # file jq-expr
    jq -r "($2) // \"–\" | if type == \"number\" then (. * 10 | round / 10) else . end" "$OUT/$1" 2> /dev/null || echo "–"
}
mib() { # file jq-expr (kB)
    jq -r "($2) / 1024 | . * 10 | round / 10" "$OUT/$1" 2> /dev/null || echo "–"
}
{
    echo "| | empty broker | $SESSIONS sessions + $RETAINED retained: first start | restart |"
    echo "|---|---:|---:|---:|"
    echo "| process start → first CONNACK, ms | $(get start.empty.json .start_to_connack_ms) | $(get start.first.json .start_to_connack_ms) | $(get start.restart.json .start_to_connack_ms) |"
    echo "| process start → SUBACK of a first SUBSCRIBE (waits for the retained index), ms | $(get start.empty.json .start_to_first_suback_ms) | $(get start.first.json .start_to_first_suback_ms) | $(get start.restart.json .start_to_first_suback_ms) |"
    echo "| RSS at first CONNACK, MiB | $(mib start.empty.json .rss_kb_at_connack) | $(mib start.first.json .rss_kb_at_connack) | $(mib start.restart.json .rss_kb_at_connack) |"
    echo "| RSS ${HOLD_SECS} s later, MiB | $(mib start.empty.json .rss_kb_after_hold) | $(mib start.first.json .rss_kb_after_hold) | $(mib start.restart.json .rss_kb_after_hold) |"
    echo "| gateway CPU before the first CONNACK, s | $(get start.empty.json .start_cpu_s) | $(get start.first.json .start_cpu_s) | $(get start.restart.json .start_cpu_s) |"
    echo "| gateway CPU % while idle over those ${HOLD_SECS} s | $(get start.empty.json .hold_cpu_pct) | $(get start.first.json .hold_cpu_pct) | $(get start.restart.json .hold_cpu_pct) |"
    echo "| SUBSCRIBE → SUBACK p50 / max ms ($SUBACK_PROBES one after the other) | $(get start.empty.json .suback.p50_ms) / $(get start.empty.json .suback.max_ms) | $(get start.first.json .suback.p50_ms) / $(get start.first.json .suback.max_ms) | $(get start.restart.json .suback.p50_ms) / $(get start.restart.json .suback.max_ms) |"
    echo "| peak RSS (VmHWM), MiB | $(mib start.empty.json .hwm_kb) | $(mib start.first.json .hwm_kb) | $(mib start.restart.json .hwm_kb) |"
    echo "| reconnect ($RECONNECT, $RECONNECT_CONCURRENCY at a time): CONNECT → CONNACK p50 / p99 / max µs | – | $(get reconnect.first.json .reconnect.connack_latency_us.p50) / $(get reconnect.first.json .reconnect.connack_latency_us.p99) / $(get reconnect.first.json .reconnect.connack_latency_us.max) | $(get reconnect.restart.json .reconnect.connack_latency_us.p50) / $(get reconnect.restart.json .reconnect.connack_latency_us.p99) / $(get reconnect.restart.json .reconnect.connack_latency_us.max) |"
    echo "| reconnect: session present / absent | – | $(get reconnect.first.json .reconnect.session_present) / $(get reconnect.first.json .reconnect.session_absent) | $(get reconnect.restart.json .reconnect.session_present) / $(get reconnect.restart.json .reconnect.session_absent) |"
    echo
    echo "state-fill: $(get fill.json .state_fill.records_per_s) records/s, $(get fill.json .state_fill.elapsed_s) s; Kafka data after the fill: $(awk '{ printf "%.0f MiB", $1 / 1024 }' "$OUT/kafka-data-kb.txt" 2> /dev/null || echo –)"
    if [[ -f "$OUT/b.state.json" ]]; then
        echo
        echo "| part b: $(get b.state.json .subscribers) persistent QoS 1 subscribers × $(get b.state.json .rate_per_subscriber) msg/s, $(get b.state.json .window_s) s | |"
        echo "|---|---:|"
        echo "| deliveries received /s | $(get b.json .messages.received_per_s) (lost $(get b.json .messages.lost), duplicates $(get b.json .messages.duplicates)) |"
        echo "| publish → delivery p50 / p99 µs | $(get b.json .messages.latency_us.p50) / $(get b.json .messages.latency_us.p99) |"
        echo "| records written into the sessions topic /s | $(get b.state.json .session_records_per_s) |"
        echo "| gateway CPU % (200 = both cores) | $(get b.state.json .gateway_cpu_pct) |"
        echo "| broker CPU % | $(get b.state.json .broker_cpu_pct) |"
    fi
} | tee "$OUT/table.md"
echo "results: $OUT" >&2
