#!/usr/bin/env bash
# The Kafka core service under load: lmq-gateway (core.kind: kafka) versus a raw librdkafka
# producer writing the same records to the same broker with the same producer settings.
#
# Usage: scripts/bench-kafka.sh [BROKER...]   BROKER = kafka | mock   (default: kafka mock)
#
# Per broker, one after the other (the broker starts fresh, then one gateway on it):
#   gw-ingest  lmq-bench fan-in --qos 1 --no-subscriber: MQTT → Kafka msg/s, publish → PUBACK latency
#   raw        lmq-bench kafka-raw: the same records, msg/s and send → delivery-report latency
#   e2e        lmq-bench fan-in --qos 1 --rate E2E_RATE: MQTT → Kafka → MQTT latency (gateway tail)
#   raw-tailed lmq-bench kafka-raw while the gateway runs: its live tail reads back every record
#              of the parent topic (subscribers or not), so this shows what that read-back costs
# and pidstat samples the gateway, the broker and the load generator every second.
#
# Brokers: Apache Kafka 4.x, one KRaft node (scripts/kafka-dev.sh, heap KAFKA_HEAP [1g] here),
# and librdkafka's mock cluster (`lmq-bench mock-kafka`, in its own process).
#
# Before the measured runs, a 2 s publish through the gateway creates the parent topic and
# warms the producer up, so topic creation is not part of the numbers.
#
# Environment knobs (defaults in brackets):
#   DURATION [10]  seconds per run          CLIENTS [8] publishers / senders
#   INFLIGHT [64]  window per publisher     PAYLOAD [64] bytes
#   E2E_RATE [2000] msg/s of the latency run (all publishers together)
#   FETCH_WAIT_MS [100] core.kafka.fetch_wait_max_ms (the gateway's default)
#   LINGER_MS [5]  core.kafka.linger_ms and the raw producer's linger.ms
#   GW_PORT [28841] KAFKA_BENCH_PORT [29192]
#   OUT [a new temp dir]  JSON results, pidstat logs, broker and gateway logs, table.md
#   SKIP_BUILD [0] 1 = use the binaries already built
set -euo pipefail

BROKERS=("$@")
[[ ${#BROKERS[@]} -gt 0 ]] || BROKERS=(kafka mock)
DURATION="${DURATION:-10}"
CLIENTS="${CLIENTS:-8}"
INFLIGHT="${INFLIGHT:-64}"
PAYLOAD="${PAYLOAD:-64}"
E2E_RATE="${E2E_RATE:-2000}"
FETCH_WAIT_MS="${FETCH_WAIT_MS:-100}"
LINGER_MS="${LINGER_MS:-5}"
GW_PORT="${GW_PORT:-28841}"
KAFKA_BENCH_PORT="${KAFKA_BENCH_PORT:-29192}"
export KAFKA_HEAP="${KAFKA_HEAP:-1g}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
WORK="$(mktemp -d -t lmq-bench-kafka.XXXXXX)"
OUT="${OUT:-$WORK/results}"
mkdir -p "$OUT"
export LC_ALL=C

for tool in jq pidstat; do
    command -v "$tool" > /dev/null || {
        echo "$tool is required (apt-get install -y jq sysstat)" >&2
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
    "$ROOT/scripts/kafka-dev.sh" stop "$WORK/kafka" > /dev/null 2>&1 || true
    rm -rf "$WORK/kafka"
}
trap cleanup EXIT INT TERM

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release --workspace --bins)
fi
GW="$TARGET/release/lmq-gateway"
BENCH="$TARGET/release/lmq-bench"

wait_port() { # port [tries]
    for _ in $(seq 1 "${2:-300}"); do
        if (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

for port in "$GW_PORT" "$KAFKA_BENCH_PORT"; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
        echo "port $port is already in use (set GW_PORT / KAFKA_BENCH_PORT)" >&2
        exit 69
    fi
done

# ---- brokers: each sets BOOTSTRAP and BROKER_PID ------------------------------------------
start_broker() { # name
    case "$1" in
        kafka)
            "$ROOT/scripts/kafka-dev.sh" start "$WORK/kafka" "$KAFKA_BENCH_PORT" >&2
            # kafka-dev.sh runs the JVM with exec: the recorded pid is the broker's.
            BROKER_PID=$(cat "$WORK/kafka/pid")
            BOOTSTRAP="localhost:$KAFKA_BENCH_PORT"
            ;;
        mock)
            "$BENCH" mock-kafka --partitions 4 > "$WORK/mock.addr" 2> "$WORK/mock.log" &
            BROKER_PID=$!
            PIDS+=("$BROKER_PID")
            for _ in $(seq 100); do [[ -s "$WORK/mock.addr" ]] && break; sleep 0.1; done
            BOOTSTRAP=$(head -n1 "$WORK/mock.addr")
            [[ -n "$BOOTSTRAP" ]] || {
                echo "mock cluster did not start: $(cat "$WORK/mock.log")" >&2
                return 1
            }
            ;;
        *)
            echo "unknown broker $1 (kafka | mock)" >&2
            return 64
            ;;
    esac
}

stop_pid() { # pid
    kill "$1" 2> /dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2> /dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2> /dev/null || true
}

stop_broker() { # name
    if [[ "$1" == kafka ]]; then
        "$ROOT/scripts/kafka-dev.sh" stop "$WORK/kafka" > /dev/null
    else
        stop_pid "$BROKER_PID"
    fi
}

start_gateway() { # broker-name bootstrap -> GW_PID
    cat > "$WORK/gw-$1.yaml" << EOF
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
    bootstrap_servers: "$2"
    create_topics: true
    linger_ms: $LINGER_MS
    fetch_wait_max_ms: $FETCH_WAIT_MS
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
log:
  level: warn
EOF
    "$GW" serve -c "$WORK/gw-$1.yaml" > "$OUT/gw-$1.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_port "$GW_PORT" 600
}

# ---- runs ---------------------------------------------------------------------------------
# cpu_avg FILE PID: mean %CPU of PID over the publishing window (pidstat samples 3..DURATION,
# i.e. without connection setup and the drain).
cpu_avg() {
    awk -v pid="$2" -v first=3 -v last="$DURATION" \
        '$3 == pid && $8 ~ /^[0-9.]+$/ { n++; if (n >= first && n <= last) { s += $8; k++ } } END { if (k) printf "%.0f", s / k; else printf "–" }' "$1"
}

# run_case CASE BROKER lmq-bench-args... -> $OUT/CASE.BROKER.json, .pidstat
run_case() {
    local case=$1 broker=$2
    shift 2
    local file="$OUT/$case.$broker.json" pids="$BROKER_PID"
    [[ -n "${GW_PID:-}" ]] && pids="$GW_PID,$BROKER_PID"
    echo "== $case on $broker: lmq-bench $*" >&2
    echo "$broker: lmq-bench $*" >> "$OUT/commands.txt"
    echo "$case $broker start: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    pidstat -u -p "$pids" 1 > "$OUT/$case.$broker.pidstat" 2>&1 &
    local stat_pid=$! rc=0
    "$BENCH" "$@" --json > "$file" 2> "$OUT/$case.$broker.err" || rc=$?
    kill "$stat_pid" 2> /dev/null && wait "$stat_pid" 2> /dev/null || true
    echo "$case $broker end:   $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    if [[ ! -s "$file" ]]; then
        echo "   failed (exit $rc): $(head -c 300 "$OUT/$case.$broker.err")" >&2
        echo '{}' > "$file"
    elif [[ $rc != 0 ]]; then
        echo "   completed with errors: $(jq -c '.errors[:3]' "$file")" >&2
    fi
    jq -n --arg gw "$( [[ -n "${GW_PID:-}" ]] && cpu_avg "$OUT/$case.$broker.pidstat" "$GW_PID" || echo –)" \
        --arg broker "$(cpu_avg "$OUT/$case.$broker.pidstat" "$BROKER_PID")" \
        '{gateway: $gw, broker: $broker}' > "$OUT/$case.$broker.cpu.json"
    sleep 2
}

M="--clients $CLIENTS --payload $PAYLOAD --inflight $INFLIGHT --duration $DURATION"
for broker in "${BROKERS[@]}"; do
    GW_PID=""
    start_broker "$broker"
    echo "$broker: $BOOTSTRAP (pid $BROKER_PID)" >&2
    start_gateway "$broker" "$BOOTSTRAP"
    "$BENCH" fan-in --clients 1 --qos 1 --no-subscriber --duration 2 --port "$GW_PORT" > "$OUT/warm-up.$broker.txt" 2>&1
    run_case gw-ingest "$broker" fan-in $M --qos 1 --no-subscriber --port "$GW_PORT" --server-pid "$GW_PID"
    run_case e2e "$broker" fan-in $M --qos 1 --rate "$E2E_RATE" --port "$GW_PORT" --server-pid "$GW_PID"
    run_case raw-tailed "$broker" kafka-raw $M --qos 1 --bootstrap "$BOOTSTRAP" --linger-ms "$LINGER_MS"
    stop_pid "$GW_PID"
    GW_PID=""
    run_case raw "$broker" kafka-raw $M --qos 1 --bootstrap "$BOOTSTRAP" --linger-ms "$LINGER_MS"
    stop_broker "$broker"
done

# ---- report -------------------------------------------------------------------------------
get() { # case broker jq-expr
    jq -r "($3) // \"–\" | if type == \"number\" then (. * 10 | round / 10) else . end" "$OUT/$1.$2.json" 2> /dev/null || echo "–"
}
cpu() { # case broker gateway|broker
    jq -r ".$3" "$OUT/$1.$2.cpu.json" 2> /dev/null || echo "–"
}
ratio() { # a b
    awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f×", a / b; else printf "–" }'
}
row() { # label function (called with each broker)
    local line="| $1 |"
    for broker in "${BROKERS[@]}"; do
        line="$line $($2 "$broker") |"
    done
    echo "$line"
}
gw_rate() { get gw-ingest "$1" '.messages.acked_per_s'; }
raw_rate() { get raw "$1" '.messages.acked_per_s'; }
rate_ratio() { ratio "$(gw_rate "$1")" "$(raw_rate "$1")"; }
gw_p50() { get gw-ingest "$1" '.messages.ack_latency_us.p50'; }
gw_p99() { get gw-ingest "$1" '.messages.ack_latency_us.p99'; }
raw_p50() { get raw "$1" '.messages.ack_latency_us.p50'; }
raw_p99() { get raw "$1" '.messages.ack_latency_us.p99'; }
gw_cpu() { cpu gw-ingest "$1" gateway; }
gw_broker_cpu() { cpu gw-ingest "$1" broker; }
gw_client_cpu() { get gw-ingest "$1" '.client_cpu_s'; }
raw_broker_cpu() { cpu raw "$1" broker; }
raw_client_cpu() { get raw "$1" '.client_cpu_s'; }
tailed_rate() { get raw-tailed "$1" '.messages.acked_per_s'; }
tailed_gw_cpu() { cpu raw-tailed "$1" gateway; }
tailed_broker_cpu() { cpu raw-tailed "$1" broker; }
e2e_p50() { get e2e "$1" '.messages.latency_us.p50'; }
e2e_p99() { get e2e "$1" '.messages.latency_us.p99'; }
e2e_p999() { get e2e "$1" '.messages.latency_us.p999'; }
e2e_ack_p50() { get e2e "$1" '.messages.ack_latency_us.p50'; }
e2e_ack_p99() { get e2e "$1" '.messages.ack_latency_us.p99'; }
e2e_received() { echo "$(get e2e "$1" '.messages.received_per_s'), lost $(get e2e "$1" '.messages.lost')"; }
e2e_gw_cpu() { cpu e2e "$1" gateway; }
{
    header="| metric |"
    sep="|---|"
    for broker in "${BROKERS[@]}"; do
        header="$header $broker |"
        sep="$sep---:|"
    done
    echo "$header"
    echo "$sep"
    row "gateway: MQTT QoS 1 → Kafka, PUBACKs/s" gw_rate
    row "raw rdkafka producer, delivery reports/s" raw_rate
    row "**ratio gateway / raw**" rate_ratio
    row "gateway: publish → PUBACK p50 µs" gw_p50
    row "gateway: publish → PUBACK p99 µs" gw_p99
    row "raw: send → delivery report p50 µs" raw_p50
    row "raw: send → delivery report p99 µs" raw_p99
    row "gateway run: gateway CPU %" gw_cpu
    row "gateway run: broker CPU %" gw_broker_cpu
    row "gateway run: load generator CPU s" gw_client_cpu
    row "raw run: broker CPU %" raw_broker_cpu
    row "raw run: raw producer CPU s (librdkafka included)" raw_client_cpu
    row "raw while the gateway tails the topic, delivery reports/s" tailed_rate
    row "  same run: gateway CPU % (reading back and routing only)" tailed_gw_cpu
    row "  same run: broker CPU %" tailed_broker_cpu
    row "e2e @ $E2E_RATE msg/s: MQTT → Kafka → MQTT p50 µs" e2e_p50
    row "e2e: p99 µs" e2e_p99
    row "e2e: p99.9 µs" e2e_p999
    row "e2e: publish → PUBACK p50 µs" e2e_ack_p50
    row "e2e: publish → PUBACK p99 µs" e2e_ack_p99
    row "e2e: received msg/s" e2e_received
    row "e2e: gateway CPU %" e2e_gw_cpu
} | tee "$OUT/table.md"
echo "results: $OUT" >&2
