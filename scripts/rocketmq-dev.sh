#!/usr/bin/env bash
# A throw-away Apache RocketMQ name server + broker (version 5.5.0, the Java implementation,
# classic remoting protocol; two Java processes) for the RocketMQ core-service tests, run from
# the jars of `org.apache.rocketmq:rocketmq-namesrv` and `rocketmq-broker` as Maven resolves
# them from Maven Central (no other download).
#
#   scripts/rocketmq-dev.sh install     resolve the jars into the cache unless they are there
#                                       (installs Java 17 and Maven with apt when missing)
#   scripts/rocketmq-dev.sh installed   exit 0 when the jars are in the cache and java runs
#                                       (the tests ask this)
#   scripts/rocketmq-dev.sh start [DIR] fresh temp dir (or DIR; default under /dev/shm, else /tmp),
#                                       write configs, start, wait until the broker serves and
#                                       is registered with the name server; prints
#                                       `ROCKETMQ_HOME=<dir>` and `LMQ_TEST_ROCKETMQ=<namesrv>`
#   scripts/rocketmq-dev.sh stop DIR    stop the processes started in DIR (SIGTERM, SIGKILL after
#                                       5 s) and delete DIR
#   scripts/rocketmq-dev.sh restart DIR stop the processes of DIR (a clean shutdown, up to 40 s) and
#                                       start them again on its data (same NAMESRV_PORT /
#                                       BROKER_PORT as at start)
#
# Version: ROCKETMQ_VERSION (default 5.5.0, the newest 5.x whose jars are all on Maven Central;
# 5.3.3 runs too). Ports: NAMESRV_PORT (default 9876), BROKER_PORT (default 10911; the broker
# also uses BROKER_PORT+1 for HA and BROKER_PORT-2 for its VIP channel). Store files are shrunk
# for CI (64 MB commit log files, sparse; the timer wheel takes 37 MB: about 42 MB in all) and
# live under the temp dir, as do the logs (DIR/logs: the processes' output;
# DIR/logs/rocketmqlogs: their log files). On a failed start the processes are stopped and DIR
# is kept for its logs. Start: 3-5 s, or about 13 s when the broker's registration at start is
# skipped (see `start`).
# Cache: ${LMQ_BROKER_CACHE:-~/.cache/lmq-brokers}/rocketmq-$ROCKETMQ_VERSION (137 jars, 94 MB;
# Maven's own repository, ~/.m2, keeps the downloads too).
# Memory: name server heap 128 MB (about 120 MB resident), broker heap ROCKETMQ_BROKER_HEAP
# (default 256m; about 300 MB resident).
set -euo pipefail
ROCKETMQ_VERSION="${ROCKETMQ_VERSION:-5.5.0}"
NAMESRV_PORT="${NAMESRV_PORT:-9876}"
BROKER_PORT="${BROKER_PORT:-10911}"
CACHE="${LMQ_BROKER_CACHE:-$HOME/.cache/lmq-brokers}/rocketmq-$ROCKETMQ_VERSION"
LIB="$CACHE/lib"

# shellcheck source=lib/maven-jars.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/maven-jars.sh"

installed() { jars_installed "$LIB"; }

install() {
  jars_install "Apache RocketMQ $ROCKETMQ_VERSION" "$CACHE" "$LIB" \
    "org.apache.rocketmq:rocketmq-namesrv:$ROCKETMQ_VERSION" "org.apache.rocketmq:rocketmq-broker:$ROCKETMQ_VERSION"
}

wait_port() { # port seconds
  local i
  for ((i = 0; i <= $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    [ "$2" = 0 ] || sleep 0.1
  done
  return 1
}

# Java options of both processes (with -Duser.home=DIR: the logs go to DIR/logs/rocketmqlogs):
# no TLS (the classic clients speak plain TCP; the permissive default generates a self-signed
# certificate at each start, seconds on a small machine), a serial collector and only the
# quick JIT tier (start-up time and CPU over peak speed on a small machine).
JVM_FLAGS=(-Dtls.server.mode=disabled -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData
  -Djava.net.preferIPv4Stack=true)

start() {
  installed || { echo "Apache RocketMQ $ROCKETMQ_VERSION is not installed: run $0 install" >&2; exit 1; }
  # The broker will not start when the disk holding its store is about 75 % full (unless the
  # disk ratios below are raised), which build machines often are: prefer a tmpfs (/dev/shm).
  local root="${ROCKETMQ_TMP_ROOT:-/dev/shm}"
  [ -d "$root" ] && [ -w "$root" ] || root=/tmp
  local dir="${1:-$(mktemp -d "$root/lmq-rocketmq.XXXXXX")}"
  mkdir -p "$dir/conf" "$dir/logs" "$dir/store"
  cat >"$dir/conf/namesrv.properties" <<PROPS
listenPort=$NAMESRV_PORT
bindAddress=127.0.0.1
kvConfigPath=$dir/namesrv/kvConfig.json
configStorePath=$dir/namesrv/namesrv.properties
PROPS
  cat >"$dir/conf/broker.conf" <<PROPS
brokerClusterName=DefaultCluster
brokerName=broker-a
brokerId=0
brokerIP1=127.0.0.1
listenPort=$BROKER_PORT
bindAddress=127.0.0.1
haListenPort=$((BROKER_PORT + 1))
namesrvAddr=127.0.0.1:$NAMESRV_PORT
autoCreateTopicEnable=true
storePathRootDir=$dir/store
storePathCommitLog=$dir/store/commitlog
mappedFileSizeCommitLog=67108864
mappedFileSizeConsumeQueue=600000
maxHashSlotNum=50000
maxIndexNum=200000
# The test data is tiny: only stop writing at a nearly full disk (the default is 75 %;
# maxUsed < cleanForcibly < warningLevel is required).
diskMaxUsedSpaceRatio=95
diskSpaceCleanForciblyRatio=96
diskSpaceWarningLevelRatio=97
PROPS
  export ROCKETMQ_HOME="$dir"
  local cp="$LIB/*" heap="${ROCKETMQ_BROKER_HEAP:-256m}"
  # Each process with its own logback configuration (both are in the jars; the first found
  # would be the broker's).
  (cd "$dir" && exec java -Xms128m -Xmx128m -XX:MaxDirectMemorySize=64m "${JVM_FLAGS[@]}" -Duser.home="$dir" \
    -Drmq.logback.configurationFile=rmq.namesrv.logback.xml -cp "$cp" \
    org.apache.rocketmq.namesrv.NamesrvStartup -c "$dir/conf/namesrv.properties" \
    </dev/null >"$dir/logs/namesrv.out" 2>&1) &
  echo $! >"$dir/namesrv.pid"
  wait_port "$NAMESRV_PORT" 60 || {
    tail -20 "$dir/logs/namesrv.out" >&2
    echo "name server did not start (logs kept in $dir/logs)" >&2
    stop_processes "$dir" 5
    exit 1
  }
  (cd "$dir" && exec java -Xms"$heap" -Xmx"$heap" -XX:MaxDirectMemorySize=256m "${JVM_FLAGS[@]}" -Duser.home="$dir" \
    -Drmq.logback.configurationFile=rmq.broker.logback.xml -cp "$cp" \
    org.apache.rocketmq.broker.BrokerStartup -c "$dir/conf/broker.conf" \
    </dev/null >"$dir/logs/broker.out" 2>&1) &
  echo $! >"$dir/broker.pid"
  # Ready once the broker has started its services (`boot success` on its standard output)
  # and has registered with the name server: without a route there, clients can neither send
  # nor create topics. The registration at start is skipped when the broker's check of the
  # name server's reachability has not finished yet (a race, common on a busy machine); the
  # periodic one follows 10 s later. Only log lines written by this start count (`restart`).
  local log="$dir/logs/rocketmqlogs/broker.log" i
  local from=$(($(stat -c %s "$log" 2>/dev/null || echo 0) + 1))
  for ((i = 0; i < 1200; i++)); do
    if grep -qs "boot success" "$dir/logs/broker.out" &&
      tail -c +"$from" "$log" 2>/dev/null | grep -qF "name server completed. TargetHost=127.0.0.1:$NAMESRV_PORT" &&
      wait_port "$BROKER_PORT" 0; then
      echo "ROCKETMQ_HOME=$dir"
      echo "LMQ_TEST_ROCKETMQ=127.0.0.1:$NAMESRV_PORT"
      return 0
    fi
    kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || break
    sleep 0.1
  done
  grep -hE "ERROR|Exception|Caused by" "$dir/logs/broker.out" "$dir/logs/rocketmqlogs/broker.log" 2>/dev/null | tail -20 >&2 || true
  echo "broker did not start (logs kept in $dir/logs; disk: $(df -h "$dir" | tail -1))" >&2
  stop_processes "$dir" 5
  exit 1
}

# SIGTERM to both processes, up to GRACE seconds for them to end, then SIGKILL. A clean stop
# takes the broker 15-20 s (its service threads are joined one by one), so `stop`, which
# deletes the data anyway, waits 5 s (ROCKETMQ_STOP_GRACE) and `restart` 40 s (the broker
# flushes and checkpoints its store, as on an operator's restart). Only a process whose command
# line names DIR is signalled (a stale pid file may name another process by now).
stop_processes() { # dir grace-seconds
  local dir="$1" grace="$2" p pid end pids=()
  for p in broker namesrv; do
    [ -f "$dir/$p.pid" ] || continue
    pid="$(cat "$dir/$p.pid")"
    rm -f "$dir/$p.pid"
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-Duser.home=$dir " || continue
    kill "$pid" 2>/dev/null && pids+=("$pid")
  done
  end=$((SECONDS + grace))
  while ((SECONDS < end)); do running "${pids[@]}" || return 0; sleep 0.1; done
  kill -9 "${pids[@]}" 2>/dev/null || true
  end=$((SECONDS + 10))
  while ((SECONDS < end)); do running "${pids[@]}" || return 0; sleep 0.1; done
  echo "rocketmq-dev: processes ${pids[*]} of $dir still running after SIGKILL" >&2
  return 1
}

running() { # pid... (a zombie is not running)
  local pid
  for pid in "$@"; do
    ps -o stat= -p "$pid" 2>/dev/null | grep -qv '^Z' && return 0
  done
  return 1
}

stop() {
  local dir="${1:?usage: stop DIR}"
  stop_processes "$dir" "${ROCKETMQ_STOP_GRACE:-5}"
  case "$dir" in /tmp/lmq-rocketmq.* | /dev/shm/lmq-rocketmq.* | "${ROCKETMQ_TMP_ROOT:-/nonexistent}"/lmq-rocketmq.*) rm -rf "$dir" ;; esac
}

case "${1:-}" in
  install) install ;;
  installed) installed ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  restart) stop_processes "${2:?usage: restart DIR}" "${ROCKETMQ_RESTART_GRACE:-40}" && start "$2" ;;
  *) echo "usage: $0 install | installed | start [DIR] | stop DIR | restart DIR" >&2; exit 2 ;;
esac
