#!/usr/bin/env bash
# A Kafka-protocol broker for development and tests: tansu (crates.io, Apache-2.0) with its
# sqlite storage engine. Used by scripts/test.sh, by the Kafka integration tests (which run
# their own brokers through `run`) and by developers.
#
#   scripts/kafka-dev.sh install            install tansu into ~/.cargo/bin unless that version is there
#   scripts/kafka-dev.sh start [DIR] [PORT] start a broker in the background (data in DIR, kept across restarts)
#   scripts/kafka-dev.sh stop  [DIR]        stop it
#   scripts/kafka-dev.sh run   DIR PORT [ADVERTISED_PORT]
#                                           run a broker in the foreground (exec; for test harnesses);
#                                           ADVERTISED_PORT: the port clients are told to use (a proxy)
#   scripts/kafka-dev.sh wait  PORT         wait until the broker answers on PORT
#
# Defaults: DIR=${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}, PORT=${KAFKA_PORT:-9092}.
#
# What tansu 0.6 needs that real Kafka does not (harness only, never the product):
#   - the sqlite path is relative to the working directory, and tansu reads a `.env` there:
#     the broker runs inside DIR;
#   - tansu 0.6 lacks an index on header(topition, offset_id): without it fetches of records
#     with headers become quadratic and stall, so it is created once the tables exist.
set -euo pipefail

TANSU_VERSION=0.6.0
CMD=${1:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

tansu_bin() {
  if command -v tansu >/dev/null 2>&1; then command -v tansu; else echo "$HOME/.cargo/bin/tansu"; fi
}

install() {
  local bin
  bin=$(tansu_bin)
  if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q " $TANSU_VERSION\$"; then
    return 0
  fi
  command -v sqlite3 >/dev/null 2>&1 || need_apt sqlite3
  echo "kafka-dev: installing tansu $TANSU_VERSION (takes 15-35 minutes on 2 cores)" >&2
  CARGO_TARGET_DIR=${TOOLS_TARGET_DIR:-$HOME/.cache/lmq-tools-target} \
    cargo install tansu --locked --version "$TANSU_VERSION" --features libsql >&2
}

need_apt() {
  local SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

wait_port() {
  local port=$1 tries=${2:-300}
  for _ in $(seq "$tries"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "kafka-dev: nothing answers on port $port" >&2
  return 1
}

add_index() {
  local db=$1
  for _ in $(seq 100); do
    if sqlite3 "$db" 'create index if not exists header_topition_offset on header(topition, offset_id);' 2>/dev/null; then
      touch "$db.indexed"
      return 0
    fi
    sleep 0.1
  done
  echo "kafka-dev: could not add the header index to $db" >&2
}

run() {
  local dir=$1 port=$2 advertised=${3:-$2}
  mkdir -p "$dir"
  cd "$dir"
  : >.env
  rm -f tansu.db.indexed
  (wait_port "$port" 600 && add_index "$dir/tansu.db") >/dev/null 2>&1 &
  exec "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://localhost:$advertised" \
    --storage-engine 'sqlite://tansu.db?maintenance_interval=5s'
}

case "$CMD" in
  install) install ;;
  run) run "$2" "$3" "${4:-$3}" ;;
  wait)
    wait_port "$2" 600
    ;;
  start)
    dir=${2:-${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}}
    port=${3:-${KAFKA_PORT:-9092}}
    install
    mkdir -p "$dir"
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "kafka-dev: already running (pid $(cat "$dir/pid"), $dir)"
      exit 0
    fi
    nohup "$ROOT/scripts/kafka-dev.sh" run "$dir" "$port" >"$dir/broker.log" 2>&1 &
    echo $! >"$dir/pid"
    wait_port "$port"
    for _ in $(seq 100); do [ -f "$dir/tansu.db.indexed" ] && break; sleep 0.1; done
    echo "kafka-dev: tansu on localhost:$port (pid $(cat "$dir/pid"), data and log in $dir)"
    ;;
  stop)
    dir=${2:-${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}}
    if [ -f "$dir/pid" ]; then
      pid=$(cat "$dir/pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/pid"
      echo "kafka-dev: stopped"
    fi
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
