#!/usr/bin/env bash
# Apache Kafka for development and tests: one KRaft process that is both broker and
# controller, run from the jars of `org.apache.kafka:kafka_2.13` as Maven resolves them from
# Maven Central (no other download). Used by scripts/test.sh, by the Kafka integration tests
# (which run their own brokers through `run`) and by developers.
#
#   scripts/kafka-dev.sh install            resolve the jars into the cache unless they are there
#   scripts/kafka-dev.sh installed          exit 0 when the jars are in the cache (tests ask this)
#   scripts/kafka-dev.sh start [DIR] [PORT] start a broker in the background (data in DIR, kept
#                                           across restarts); returns once it answers on PORT
#   scripts/kafka-dev.sh stop  [DIR]        stop it (SIGTERM, then SIGKILL after 30 s)
#   scripts/kafka-dev.sh run   DIR PORT     run a broker in the foreground (exec; for test
#                                           harnesses); formats DIR on its first run
#   scripts/kafka-dev.sh wait  PORT         wait until something answers on PORT
#
# Defaults: DIR=${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}, PORT=${KAFKA_PORT:-9092}.
# Cache: ${LMQ_BROKER_CACHE:-~/.cache/lmq-brokers}/kafka-$KAFKA_VERSION (about 45 MB; Maven's
# own repository, ~/.m2, keeps the downloads too). Heap: KAFKA_HEAP (default 512m).
# The controller listens on a second port, chosen free at the first run of DIR and kept in
# DIR/controller.port so that a restart finds the same quorum.
set -euo pipefail

KAFKA_VERSION=${KAFKA_VERSION:-4.4.0}
# Kafka logs through SLF4J 1.7: this binding sends it to log4j2 (configured in `run`).
LOG4J_VERSION=2.25.5
CMD=${1:-}
CACHE=${LMQ_BROKER_CACHE:-$HOME/.cache/lmq-brokers}/kafka-$KAFKA_VERSION
LIB=$CACHE/lib

# shellcheck source=lib/maven-jars.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/maven-jars.sh"

installed() { jars_installed "$LIB"; }

install() {
  jars_install "Apache Kafka $KAFKA_VERSION" "$CACHE" "$LIB" \
    "org.apache.kafka:kafka_2.13:$KAFKA_VERSION" "org.apache.logging.log4j:log4j-slf4j-impl:$LOG4J_VERSION"
}

wait_port() {
  local port=$1 tries=${2:-600}
  for _ in $(seq "$tries"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "kafka-dev: nothing answers on port $port" >&2
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# The broker's settings: one node, replication factor 1 everywhere, internal topics and
# buffers sized for tests on a small machine.
write_config() {
  local dir=$1 port=$2 cport=$3
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://localhost:${KAFKA_ADVERTISED_PORT:-$port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
num.network.threads=2
num.io.threads=4
background.threads=4
num.recovery.threads.per.data.dir=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.index.size.max.bytes=1048576
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.threads=1
PROPS
  cat >"$dir/log4j2.properties" <<'PROPS'
appender.out.type=Console
appender.out.name=out
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.out.ref=out
logger.server.name=kafka.server.BrokerServer
logger.server.level=INFO
logger.controller.name=kafka.server.ControllerServer
logger.controller.level=INFO
logger.group.name=org.apache.kafka.coordinator.group
logger.group.level=INFO
PROPS
}

run() {
  local dir=$1 port=$2 cport
  installed || { echo "kafka-dev: Apache Kafka is not installed: run scripts/kafka-dev.sh install" >&2; exit 1; }
  mkdir -p "$dir"
  if [ -f "$dir/controller.port" ]; then
    cport=$(cat "$dir/controller.port")
  else
    cport=$(free_port)
    echo "$cport" >"$dir/controller.port"
  fi
  write_config "$dir" "$port" "$cport"
  local java_opts=(-Xms"${KAFKA_HEAP:-512m}" -Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/log4j2.properties")
  if [ ! -f "$dir/data/meta.properties" ]; then
    java -Xmx256m -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$LIB/*" kafka.tools.StorageTool format \
      --cluster-id "$(java -cp "$LIB/*" kafka.tools.StorageTool random-uuid 2>/dev/null)" \
      --config "$dir/server.properties" --ignore-formatted >/dev/null
  fi
  exec java "${java_opts[@]}" -cp "$LIB/*" kafka.Kafka "$dir/server.properties"
}

case "$CMD" in
  install) install ;;
  installed) installed ;;
  run) run "$2" "$3" ;;
  wait) wait_port "$2" ;;
  start)
    dir=${2:-${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}}
    port=${3:-${KAFKA_PORT:-9092}}
    install
    mkdir -p "$dir"
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "kafka-dev: already running (pid $(cat "$dir/pid"), $dir)"
      exit 0
    fi
    nohup "$0" run "$dir" "$port" >"$dir/broker.log" 2>&1 &
    echo $! >"$dir/pid"
    wait_port "$port" 1200 || { tail -30 "$dir/broker.log" >&2; exit 1; }
    echo "kafka-dev: Apache Kafka $KAFKA_VERSION on localhost:$port (pid $(cat "$dir/pid"), data and log in $dir)"
    ;;
  stop)
    dir=${2:-${KAFKA_DEV_DIR:-/tmp/lmq-kafka-dev}}
    if [ -f "$dir/pid" ]; then
      pid=$(cat "$dir/pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/pid"
      echo "kafka-dev: stopped"
    fi
    ;;
  *)
    sed -n '2,21p' "$0" >&2
    exit 2
    ;;
esac
