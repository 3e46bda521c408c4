#!/usr/bin/env bash
# A throw-away RocketMQ name server + broker (the Rust implementation, classic remoting
# protocol) for the RocketMQ core-service tests.
#
#   scripts/rocketmq-dev.sh install     cargo install rocketmq-namesrv / rocketmq-broker 1.0.0 unless present
#   scripts/rocketmq-dev.sh start [DIR] fresh temp dir (or DIR; default under /dev/shm, else /tmp),
#                                       write configs, start, wait until ready;
#                                       prints `ROCKETMQ_HOME=<dir>` and `LMQ_TEST_ROCKETMQ=<namesrv>`
#   scripts/rocketmq-dev.sh stop DIR    stop the processes started in DIR and delete DIR
#   scripts/rocketmq-dev.sh restart DIR stop the processes of DIR and start them again on its data
#                                       (same NAMESRV_PORT / BROKER_PORT as at start)
#
# Ports: NAMESRV_PORT (default 9876), BROKER_PORT (default 10911; the broker also uses
# BROKER_PORT+1 for HA and BROKER_PORT-2 for its VIP channel). Store files are shrunk for CI
# (about 72 MB of disk instead of 1.5 GB) and live under the temp dir.
set -euo pipefail
VERSION=1.0.0
NAMESRV_PORT="${NAMESRV_PORT:-9876}"
BROKER_PORT="${BROKER_PORT:-10911}"

have_version() {
  command -v "$1" >/dev/null 2>&1 && cargo install --list 2>/dev/null | grep -q "^$2 v$VERSION:"
}

install() {
  # Both installs share one target dir so the second reuses the first's artifacts (~17 min each on 2 cores).
  export CARGO_TARGET_DIR="${ROCKETMQ_INSTALL_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/rocketmq-tools}"
  if ! have_version rocketmq-namesrv-rust rocketmq-namesrv; then
    cargo install --locked --version "$VERSION" rocketmq-namesrv
  fi
  if ! have_version rocketmq-broker-rust rocketmq-broker; then
    cargo install --locked --version "$VERSION" rocketmq-broker
  fi
}

wait_port() { # port seconds
  local i
  for ((i = 0; i <= $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    [ "$2" = 0 ] || sleep 0.1
  done
  return 1
}

start() {
  # The broker will not start when the disk holding its store is about 75 % full (whatever the
  # disk ratios configured below), which build machines often are: prefer a tmpfs (/dev/shm).
  local root="${ROCKETMQ_TMP_ROOT:-/dev/shm}"
  [ -d "$root" ] && [ -w "$root" ] || root=/tmp
  local dir="${1:-$(mktemp -d "$root/lmq-rocketmq.XXXXXX")}"
  mkdir -p "$dir/conf" "$dir/logs" "$dir/store"
  cat >"$dir/conf/namesrv.toml" <<TOML
rocketmqHome = "$dir"
kvConfigPath = "$dir/namesrv/kvConfig.json"
configStorePath = "$dir/namesrv/namesrv.properties"
TOML
  cat >"$dir/conf/broker.toml" <<TOML
[broker]
listenPort = $BROKER_PORT
brokerIp1 = "127.0.0.1"
storePathRootDir = "$dir/store"
namesrvAddr = "127.0.0.1:$NAMESRV_PORT"
autoCreateTopicEnable = true

[broker.brokerIdentity]
brokerName = "broker-a"
brokerClusterName = "DefaultCluster"
brokerId = 0

[store]
haListenPort = $((BROKER_PORT + 1))
storePathRootDir = "$dir/store"
storePathCommitLog = "$dir/store/commitlog"
mappedFileSizeCommitLog = 67108864
mappedFileSizeConsumeQueue = 600000
maxHashSlotNum = 50000
maxIndexNum = 200000
# The test data is tiny: only stop writing at a nearly full disk (the default is 75 %;
# maxUsed < cleanForcibly < warningLevel is required).
diskMaxUsedSpaceRatio = 95
diskSpaceCleanForciblyRatio = 96
diskSpaceWarningLevelRatio = 97

[logging]
filter = "info"
TOML
  export ROCKETMQ_HOME="$dir" ROCKETMQ_SHUTDOWN_TIMEOUT_SECONDS=10
  rocketmq-broker-rust -c "$dir/conf/broker.toml" -p >"$dir/logs/broker-check.log" 2>&1 || {
    cat "$dir/logs/broker-check.log" >&2
    echo "broker config refused" >&2
    exit 1
  }
  (cd "$dir" && exec rocketmq-namesrv-rust -c "$dir/conf/namesrv.toml" --bindAddress 127.0.0.1 --listenPort "$NAMESRV_PORT" \
    >"$dir/logs/namesrv.log" 2>&1) &
  echo $! >"$dir/namesrv.pid"
  wait_port "$NAMESRV_PORT" 30 || { tail -20 "$dir/logs/namesrv.log" >&2; echo "name server did not start" >&2; exit 1; }
  (cd "$dir" && exec rocketmq-broker-rust -c "$dir/conf/broker.toml" -n "127.0.0.1:$NAMESRV_PORT" \
    >"$dir/logs/broker.log" 2>&1) &
  echo $! >"$dir/broker.pid"
  local i
  for ((i = 0; i < 600; i++)); do
    if wait_port "$BROKER_PORT" 0 && grep -q "started successfully" "$dir/logs/broker.log"; then
      echo "ROCKETMQ_HOME=$dir"
      echo "LMQ_TEST_ROCKETMQ=127.0.0.1:$NAMESRV_PORT"
      return 0
    fi
    kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || break
    sleep 0.1
  done
  grep -E "WARN|ERROR" "$dir/logs/broker.log" | grep -v PopBuffer | tail -20 >&2 || true
  echo "broker did not start (log kept: $dir/logs/broker.log; disk: $(df -h "$dir" | tail -1))" >&2
  stop_processes "$dir"
  exit 1
}

stop_processes() {
  local dir="$1" pid i
  for p in broker namesrv; do
    [ -f "$dir/$p.pid" ] || continue
    pid="$(cat "$dir/$p.pid")"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

stop() {
  local dir="${1:?usage: stop DIR}"
  stop_processes "$dir"
  case "$dir" in /tmp/lmq-rocketmq.* | /dev/shm/lmq-rocketmq.* | "${ROCKETMQ_TMP_ROOT:-/nonexistent}"/lmq-rocketmq.*) rm -rf "$dir" ;; esac
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  restart) stop_processes "${2:?usage: restart DIR}" && start "$2" ;;
  *) echo "usage: $0 install | start [DIR] | stop DIR | restart DIR" >&2; exit 2 ;;
esac
