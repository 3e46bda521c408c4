#!/usr/bin/env bash
# Delayed messages (`$delayed/<seconds>/<topic>`) on the embedded core service, with lmq-bench.
#
# Usage: scripts/bench-delay.sh [PART...]    PART = ingest | lateness | forward | pending
#                                            (default: all four, in that order)
#
#   ingest    QoS 1 ingest (8 publishers × 64 in flight, 64-byte payloads, no subscriber) in
#             ROUNDS alternating rounds: normal messages and delayed ones (1 h: nothing is
#             forwarded during the run) on the gateway, and normal ones on Mosquitto (which has
#             no delayed messages) as the reference. Prints each run and the medians, the ratio
#             delayed / normal (goal ≥ 0.8) and gateway / Mosquitto.
#   lateness  For each of LATE_RATE (a list) msg/s of delayed QoS 1 messages with 1–5 s delays (5 publishers, one
#             delay each) to a subscriber, while NORMAL_RATE msg/s of normal QoS 1 fan-in flow
#             (8 publishers → 1 subscriber) in a second lmq-bench, both for LATE_SECS s. Lateness
#             = receive − (send + delay) at the subscriber, and the gateway's own
#             lmq_delayed_lateness_seconds (due time → written to its topic) over the same run.
#   forward   How fast the forwarder delivers: BURST delayed messages (2 s) published as fast as
#             the gateway takes them, to a subscriber; lateness and delivery rate.
#   pending   A fresh gateway: RSS with nothing pending, then PENDING_STEPS × PENDING delayed
#             messages of 1 day (they stay pending), RSS after each step, and the lateness of 1–2 s delayed messages
#             published afterwards (PROBE_RATE msg/s for PROBE_SECS s), compared with the same
#             probe before the ingest; then the gateway restarts with them pending: time until
#             it serves again, RSS, and the probe once more. Control: RSS growth of a fresh
#             gateway over the same ingest of normal messages.
#
# Servers: lmq-gateway (embedded core, fsync: FSYNC, parent topic `*` with PARTITIONS partitions,
# anonymous clients, admin port for /metrics) and Mosquitto (in-memory, as in scripts/bench.sh),
# on loopback. Results (JSON per run, gateway logs, metrics scrapes, commands, load averages,
# the summary) go to OUT.
#
# Environment knobs (defaults in brackets):
#   DURATION [10] s per ingest run    ROUNDS [3]     CLIENTS [8] publishers   INFLIGHT [64]
#   PAYLOAD [64]  bytes               INGEST_DELAY [3600] s of the delayed ingest runs
#   LATE_RATE ["1000 5000"] LATE_SECS [30] NORMAL_RATE [10000]     BURST [200000]
#   PENDING [1000000] delayed messages per ingest step, PENDING_STEPS [3] steps   PROBE_RATE [100] PROBE_SECS [10]
#   FSYNC [always] the gateway's core.embedded.fsync   PARTITIONS [4] of the parent topic `*`
#   DELAY_BATCH [256] the gateway's delay.batch (records a level's forwarder moves at once)
#   GW_PORT [18861] (admin GW_PORT+10)  MOSQ_PORT [18863]
#   OUT [a new temp dir]  SKIP_BUILD [0] 1 = use the binaries already built
set -euo pipefail

PARTS=("$@")
[[ ${#PARTS[@]} -gt 0 ]] || PARTS=(ingest lateness forward pending)
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-8}"
INFLIGHT="${INFLIGHT:-64}"
PAYLOAD="${PAYLOAD:-64}"
INGEST_DELAY="${INGEST_DELAY:-3600}"
LATE_RATE="${LATE_RATE:-1000 5000}"
LATE_SECS="${LATE_SECS:-30}"
NORMAL_RATE="${NORMAL_RATE:-10000}"
BURST="${BURST:-200000}"
PENDING="${PENDING:-1000000}"
PENDING_STEPS="${PENDING_STEPS:-3}"
PROBE_RATE="${PROBE_RATE:-100}"
PROBE_SECS="${PROBE_SECS:-10}"
FSYNC="${FSYNC:-always}"
DELAY_BATCH="${DELAY_BATCH:-256}"
PARTITIONS="${PARTITIONS:-4}"
GW_PORT="${GW_PORT:-18861}"
ADMIN_PORT=$((GW_PORT + 10))
MOSQ_PORT="${MOSQ_PORT:-18863}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d -t lmq-bench-delay.XXXXXX)"
OUT="${OUT:-$WORK/results}"
mkdir -p "$OUT"
export LC_ALL=C
export PATH="$PATH:/usr/sbin"

for tool in jq curl mosquitto; do
    command -v "$tool" > /dev/null || {
        echo "$tool is required (apt-get install -y jq curl mosquitto)" >&2
        exit 69
    }
done
for port in "$GW_PORT" "$ADMIN_PORT" "$MOSQ_PORT"; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
        echo "port $port is already in use (set GW_PORT / MOSQ_PORT)" >&2
        exit 69
    fi
done

PIDS=()
GW_PID=""
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2> /dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2> /dev/null || true
    done
    rm -rf "$WORK/gw-data"
}
trap cleanup EXIT INT TERM

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --workspace --bins)
fi
GW="$TARGET/release/lmq-gateway"
BENCH="$TARGET/release/lmq-bench"
log() { echo "$*" | tee -a "$OUT/summary.txt" >&2; }

wait_port() { # port [tries of 0.1 s]
    for _ in $(seq 1 "${2:-300}"); do
        if (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

cat > "$WORK/gw.yaml" << EOF
listeners:
  - name: tcp
    bind: 127.0.0.1:$GW_PORT
    transport: tcp
    max_connections: 100000
topics:
  parents:
    - name: "*"
      partitions: $PARTITIONS
core:
  kind: embedded
  embedded:
    data_dir: $WORK/gw-data
    fsync: $FSYNC
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
log:
  level: warn
admin:
  enabled: true
  bind: 127.0.0.1:$ADMIN_PORT
delay:
  batch: $DELAY_BATCH
EOF

# start_gateway [fresh] -> GW_PID, STARTED (seconds until the MQTT and admin ports answer).
start_gateway() {
    [[ "${1:-}" == fresh ]] && rm -rf "$WORK/gw-data"
    local t0
    t0=$(date +%s.%N)
    "$GW" serve -c "$WORK/gw.yaml" >> "$OUT/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_port "$GW_PORT" 6000
    wait_port "$ADMIN_PORT" 100
    STARTED=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
}
stop_gateway() {
    kill "$GW_PID" 2> /dev/null || true
    wait "$GW_PID" 2> /dev/null || true
}

cat > "$WORK/mosquitto.conf" << EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_inflight_messages 64
max_queued_messages 100000
persistence false
EOF

metrics() { curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics"; }
metric() { # name-with-labels -> value
    metrics | awk -v m="$1" '$1 == m { v = $2 } END { print v }'
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$GW_PID/status"; }
# Until the delayed-message forwarder runs (the lease is held) on the gateway.
wait_forwarder() {
    for _ in $(seq 1 300); do
        [[ "$(metric lmq_delay_forwarder)" == 1 ]] && return 0
        sleep 0.1
    done
    echo "the gateway's delayed-message forwarder did not start" >&2
    return 1
}
# Quantile of lmq_delayed_lateness_seconds between two scrapes (files), as histogram_quantile
# computes it (linear within the bucket), in ms; then the bucket's upper bound.
hist_quantile() { # q before.prom after.prom
    awk -v q="$1" '
        FNR == NR && /^lmq_delayed_lateness_seconds_bucket/ { match($0, /le="[^"]+"/); b[substr($0, RSTART + 4, RLENGTH - 5)] = $2; next }
        /^lmq_delayed_lateness_seconds_bucket/ {
            match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5)
            n++; les[n] = le; c[n] = $2 - b[le]
        }
        END {
            total = c[n]; if (total <= 0) { print "–"; exit }
            rank = q * total; prev = 0; lo = 0
            for (i = 1; i <= n; i++) {
                if (c[i] >= rank) {
                    if (les[i] == "+Inf") { printf ">%.0f ms (bucket +Inf)", lo * 1000; exit }
                    v = lo + (les[i] - lo) * (rank - prev) / (c[i] - prev > 0 ? c[i] - prev : 1)
                    printf "%.1f ms (bucket ≤ %g ms)", v * 1000, les[i] * 1000; exit
                }
                prev = c[i]; lo = les[i]
            }
        }' "$2" "$3"
}
hist_count() { # before.prom after.prom
    awk 'FNR == NR && /^lmq_delayed_lateness_seconds_count/ { b = $2; next }
         /^lmq_delayed_lateness_seconds_count/ { print $2 - b }' "$1" "$2"
}

# bench NAME PORT PID lmq-bench-args... -> $OUT/NAME.json
bench() {
    local name=$1 port=$2 pid=$3
    shift 3
    echo "$BENCH $* --port $port --server-pid $pid --json" >> "$OUT/commands.txt"
    echo "$name start: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    "$BENCH" "$@" --port "$port" --server-pid "$pid" --json > "$OUT/$name.json" 2> "$OUT/$name.err" || true
    echo "$name end:   $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    [[ -s "$OUT/$name.json" ]] || {
        echo "   $name failed: $(head -c 300 "$OUT/$name.err")" >&2
        echo '{}' > "$OUT/$name.json"
    }
}
j() { jq -r "($2) // \"–\"" "$OUT/$1.json"; }
late() { # run -> "p50 / p99 / p99.9 / max ms, early N"
    jq -r '.messages as $m | if $m.lateness_us then
        "p50 \($m.lateness_us.p50 / 1000) / p99 \($m.lateness_us.p99 / 1000) / p99.9 \($m.lateness_us.p999 / 1000) / max \($m.lateness_us.max / 1000) ms, early \($m.early) (by ≤ \($m.early_max_us) µs), received \($m.unique) of \($m.expected), lost \($m.lost), dup \($m.duplicates)"
        else "–" end' "$OUT/$1.json"
}
median() { tr ' ' '\n' <<< "$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else printf "–" }'; }

LOAD=(fan-in --clients "$CLIENTS" --payload "$PAYLOAD" --qos 1 --inflight "$INFLIGHT" --no-subscriber)
INGEST=("${LOAD[@]}" --duration "$DURATION")

log "# bench-delay $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), results in $OUT"

part_ingest() {
    start_gateway fresh
    wait_forwarder
    mosquitto -c "$WORK/mosquitto.conf" 2> "$OUT/mosquitto.log" &
    local mosq=$!
    PIDS+=("$mosq")
    wait_port "$MOSQ_PORT"
    # Warm-up (not measured): creates the parent topic's partitions and the level's segment.
    "$BENCH" "${LOAD[@]}" --duration 2 --port "$GW_PORT" > /dev/null 2>&1 || true
    "$BENCH" "${LOAD[@]}" --duration 2 --delay-secs "$INGEST_DELAY" --port "$GW_PORT" > /dev/null 2>&1 || true
    local normal="" delayed="" mosqs="" ratios="" r
    for round in $(seq 1 "$ROUNDS"); do
        bench "ingest-normal-$round" "$GW_PORT" "$GW_PID" "${INGEST[@]}"
        sleep 2
        bench "ingest-delayed-$round" "$GW_PORT" "$GW_PID" "${INGEST[@]}" --delay-secs "$INGEST_DELAY"
        sleep 2
        bench "ingest-mosq-$round" "$MOSQ_PORT" "$mosq" "${INGEST[@]}"
        sleep 2
        for kind in normal delayed mosq; do
            r=$(j "ingest-$kind-$round" '.messages.acked_per_s | floor')
            log "ingest round $round $kind: $r PUBACKs/s, p50/p99 $(j "ingest-$kind-$round" '.messages.ack_latency_us | "\(.p50)/\(.p99)"') µs, server CPU $(j "ingest-$kind-$round" '.server.cpu_pct | floor') %"
            case $kind in normal) normal+="$r " ;; delayed) delayed+="$r " ;; mosq) mosqs+="$r " ;; esac
        done
        ratios+="$(ratio "$(j "ingest-delayed-$round" '.messages.acked_per_s')" "$(j "ingest-normal-$round" '.messages.acked_per_s')") "
    done
    local n d m
    n=$(median "$normal") d=$(median "$delayed") m=$(median "$mosqs")
    log "ingest medians (PUBACKs/s): normal $n, delayed $d, mosquitto $m; delayed/normal $(ratio "$d" "$n") (goal ≥ 0.8; per round: $ratios→ median $(median "$ratios")), normal/mosquitto $(ratio "$n" "$m"), delayed/mosquitto $(ratio "$d" "$m")"
    log "accepted delayed messages: $(metric lmq_delayed_accepted_total), pending in level 21: $(metric 'lmq_delayed_pending_messages{level="21"}')"
    kill "$mosq" 2> /dev/null || true
    stop_gateway
}

part_lateness() {
    local rate n d b a
    for rate in $LATE_RATE; do
        start_gateway fresh
        wait_forwarder
        n="lateness-$rate-normal" d="lateness-$rate-delayed" b="$OUT/lateness-$rate.before.prom" a="$OUT/lateness-$rate.after.prom"
        metrics > "$b"
        bench "$n" "$GW_PORT" "$GW_PID" fan-in --clients 8 --payload "$PAYLOAD" --qos 1 --inflight "$INFLIGHT" \
            --rate "$NORMAL_RATE" --duration "$LATE_SECS" --topic-prefix normal &
        local bg=$!
        bench "$d" "$GW_PORT" "$GW_PID" fan-in --clients 5 --payload "$PAYLOAD" --qos 1 --inflight "$INFLIGHT" \
            --rate "$rate" --duration "$LATE_SECS" --drain $((LATE_SECS + 20)) --delay-secs 1-5 --topic-prefix delayed
        wait "$bg" || true
        metrics > "$a"
        log "lateness: $rate msg/s delayed 1–5 s while $NORMAL_RATE msg/s normal QoS 1 flow, $LATE_SECS s"
        log "  subscriber lateness: $(late "$d")"
        log "  gateway lmq_delayed_lateness_seconds: $(hist_count "$b" "$a") observations, p50 $(hist_quantile 0.5 "$b" "$a"), p99 $(hist_quantile 0.99 "$b" "$a")"
        log "  normal flow meanwhile: $(j "$n" '.messages.received_per_s | floor') msg/s received, latency p50/p99 $(j "$n" '.messages.latency_us | "\(.p50)/\(.p99)"') µs, lost $(j "$n" '.messages.lost')"
        log "  gateway CPU $(j "$d" '.server.cpu_pct | floor') % over the run"
        stop_gateway
    done
}

part_forward() {
    start_gateway fresh
    wait_forwarder
    metrics > "$OUT/forward.before.prom"
    bench forward "$GW_PORT" "$GW_PID" fan-in --clients "$CLIENTS" --payload "$PAYLOAD" --qos 1 --inflight "$INFLIGHT" \
        --count "$BURST" --duration 60 --drain 120 --delay-secs 2
    metrics > "$OUT/forward.after.prom"
    local secs
    secs=$(jq -r '.messages.lateness_us.max / 1e6 + 2' "$OUT/forward.json" 2> /dev/null || echo 0)
    log "forward: $BURST messages delayed 2 s, published in $(j forward '.publish_s * 100 | round / 100') s ($(j forward '.messages.acked_per_s | floor') PUBACKs/s)"
    log "  subscriber lateness: $(late forward)"
    log "  delivered $(j forward '.messages.unique') in ≈ $(awk -v s="$secs" -v p="$(j forward '.publish_s')" 'BEGIN { printf "%.1f", s }') s after the first was due; forwarder rate ≈ $(awk -v n="$(j forward '.messages.unique')" -v m="$(j forward '.messages.lateness_us.max')" -v p="$(j forward '.publish_s')" 'BEGIN { d = m / 1e6 + p; if (d > 0) printf "%.0f", n / d; else print "–" }') msg/s"
    log "  gateway lmq_delayed_lateness_seconds: p50 $(hist_quantile 0.5 "$OUT/forward.before.prom" "$OUT/forward.after.prom"), p99 $(hist_quantile 0.99 "$OUT/forward.before.prom" "$OUT/forward.after.prom")"
    stop_gateway
}

probe() { # name
    bench "$1" "$GW_PORT" "$GW_PID" fan-in --clients 2 --payload "$PAYLOAD" --qos 1 --rate "$PROBE_RATE" \
        --duration "$PROBE_SECS" --drain 15 --delay-secs 1-2 --topic-prefix probe
}

part_pending() {
    start_gateway fresh
    wait_forwarder
    sleep 2
    local fresh
    fresh=$(rss_kb)
    # The same clients and topics once without delay, so the baseline has the parent topic,
    # the connections' buffers and the allocator's arenas warmed up.
    "$BENCH" "${LOAD[@]}" --duration 2 --port "$GW_PORT" > /dev/null 2>&1 || true
    probe pending-probe-empty
    sleep 5
    local rss0 rss1 rss2 rss3
    rss0=$(rss_kb)
    log "pending: RSS of the fresh gateway $((fresh / 1024)) MiB; after a 2 s normal ingest and the probe, nothing pending: $((rss0 / 1024)) MiB ($rss0 kB)"
    log "  1–2 s probe, nothing pending: $(late pending-probe-empty)"
    local step total=0
    for step in $(seq 1 "$PENDING_STEPS"); do
        bench "pending-ingest-$step" "$GW_PORT" "$GW_PID" "${LOAD[@]}" --count "$PENDING" --duration 600 --drain 30 --delay-secs 86400
        total=$((total + PENDING))
        sleep 6
        rss1=$(rss_kb)
        log "  ingest $step of $PENDING delayed 1 d: $(j "pending-ingest-$step" '.publish_s * 10 | round / 10') s, $(j "pending-ingest-$step" '.messages.acked_per_s | floor') PUBACKs/s; accepted $(metric lmq_delayed_accepted_total), lmq_delayed_pending_messages{level=26} $(metric 'lmq_delayed_pending_messages{level="26"}')"
        log "    RSS with $total pending: $((rss1 / 1024)) MiB ($rss1 kB), +$(((rss1 - rss0) / 1024)) MiB over none pending; peak $(awk '/^VmHWM:/ { print int($2 / 1024) }' "/proc/$GW_PID/status") MiB; data dir $(du -sm "$WORK/gw-data" | cut -f1) MiB"
    done
    probe pending-probe-full
    rss2=$(rss_kb)
    log "  1–2 s probe with $total pending: $(late pending-probe-full); RSS after $((rss2 / 1024)) MiB"
    stop_gateway
    start_gateway
    wait_forwarder
    sleep 2
    rss3=$(rss_kb)
    log "  restart with $total pending: MQTT port open after $STARTED s, RSS $((rss3 / 1024)) MiB (fresh gateway with nothing pending: $((fresh / 1024)) MiB), pending{level=26} $(metric 'lmq_delayed_pending_messages{level="26"}')"
    probe pending-probe-restarted
    log "  1–2 s probe after the restart: $(late pending-probe-restarted); RSS after $(($(rss_kb) / 1024)) MiB"
    stop_gateway
    # Control: the same warm-up and ingest of normal messages (nothing pending, same writes).
    start_gateway fresh
    wait_forwarder
    "$BENCH" "${LOAD[@]}" --duration 2 --port "$GW_PORT" > /dev/null 2>&1 || true
    sleep 5
    rss0=$(rss_kb)
    bench pending-control "$GW_PORT" "$GW_PID" "${LOAD[@]}" --count "$PENDING" --duration 600 --drain 30
    sleep 5
    rss1=$(rss_kb)
    log "  control, $PENDING normal messages instead (none pending): RSS $((rss0 / 1024)) → $((rss1 / 1024)) MiB (+$(((rss1 - rss0) / 1024)) MiB), $(j pending-control '.messages.acked_per_s | floor') PUBACKs/s"
    stop_gateway
}

for part in "${PARTS[@]}"; do
    case $part in
        ingest) part_ingest ;;
        lateness) part_lateness ;;
        forward) part_forward ;;
        pending) part_pending ;;
        *)
            echo "unknown part $part (ingest | lateness | forward | pending)" >&2
            exit 64
            ;;
    esac
done
log "results: $OUT"
