#!/usr/bin/env bash
# End-to-end check of the standard MQTT naming profile with Debian's mosquitto_pub /
# mosquitto_sub against the built gateway running deploy/gateway-mqtt.yaml (only its ports and
# data directory changed): ClientIds with spaces and UTF-8, an empty first topic level,
# `$` topics (retained, not matched by `#`), MQTT 3.1 and 5.0 clients, anonymous access.
# Prints "N passed, N failed".
set -uo pipefail
BIN=${1:-target/debug/lmq-gateway}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }
cd "$(dirname "$0")/.."

WORK=$(mktemp -d)
# shellcheck source=scripts/lib/ports.sh
. scripts/lib/ports.sh
read -r PORT WS_PORT ADMIN_PORT < <(free_ports 3)
sed -e "s|0\.0\.0\.0:1883|127.0.0.1:$PORT|" \
    -e "s|0\.0\.0\.0:8083|127.0.0.1:$WS_PORT|" \
    -e "s|127\.0\.0\.1:8080|127.0.0.1:$ADMIN_PORT|" \
    -e "s|data_dir: data |data_dir: $WORK/data |" \
    deploy/gateway-mqtt.yaml >"$WORK/gateway.yaml"
grep -q "127.0.0.1:$PORT" "$WORK/gateway.yaml" || { echo "deploy/gateway-mqtt.yaml has no 0.0.0.0:1883 listener"; exit 2; }
"$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
cleanup() { kill "$GW" 2>/dev/null; wait "$GW" 2>/dev/null; jobs -p | xargs -r kill 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

for _ in $(seq 1 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
  sleep 0.1
done

pass=0; fail=0
check() { # name expected actual
  if [ "$2" == "$3" ]; then pass=$((pass+1)); echo "ok   $1";
  else fail=$((fail+1)); echo "FAIL $1: expected [$2] got [$3]"; fi
}
H=(-h 127.0.0.1 -p "$PORT")

# A ClientId with a space, an empty first level.
timeout 10 mosquitto_sub "${H[@]}" -i 'clean retained' -q 1 -t /TopicA -C 2 -v >"$WORK/space.txt" &
S=$!
sleep 0.5
mosquitto_pub "${H[@]}" -i 'a b' -q 1 -t /TopicA -m one
# (mosquitto_pub refuses `-i ''` itself; empty ClientIds are tested in tests/mqtt_naming.rs.)
mosquitto_pub "${H[@]}" -V mqttv5 -i 'ünïcødé id' -q 1 -t /TopicA -m two
wait $S
check "spaces and UTF-8 in ClientIds, empty first level" "$(printf '/TopicA one\n/TopicA two')" "$(cat "$WORK/space.txt")"

# `$` topics: published, retained, matched by their own filter only.
timeout 3 mosquitto_sub "${H[@]}" -i wild -q 1 -t '#' -v >"$WORK/wild.txt" &
A=$!
sleep 0.5
mosquitto_pub "${H[@]}" -i dollar-pub -q 1 -r -t '$TopicA/B' -m kept
got=$(timeout 10 mosquitto_sub "${H[@]}" -i dollar-sub -q 1 -t '$TopicA/#' -C 1 -F '%r %t %p')
check "retained \$ topic" "1 \$TopicA/B kept" "$got"
wait $A
check "# does not match \$ topics" "" "$(grep -c 'TopicA/B' "$WORK/wild.txt" | sed 's/^0$//')"

# MQTT 3.1 (MQIsdp) and MQTT 5.0 clients.
for v in mqttv31 mqttv5; do
  timeout 10 mosquitto_sub "${H[@]}" -V "$v" -i "sub-$v" -q 1 -t "proto/$v" -C 1 >"$WORK/$v.txt" &
  S=$!
  sleep 0.5
  mosquitto_pub "${H[@]}" -V "$v" -i "pub-$v" -q 1 -t "proto/$v" -m "hello $v"
  wait $S
  check "$v publish and subscribe" "hello $v" "$(cat "$WORK/$v.txt")"
done

# `$SYS` stays closed: an MQTT 5 publisher hears "not authorized".
out=$(mosquitto_pub "${H[@]}" -V mqttv5 -i sys-pub -q 1 -t '$SYS/x' -m forged 2>&1)
case "$out" in *"not authorised"*|*"Not authorized"*|*"not authorized"*) pass=$((pass+1)); echo "ok   \$SYS publish refused";; *) fail=$((fail+1)); echo "FAIL \$SYS publish: [$out]";; esac

echo "$pass passed, $fail failed"
if [ "$fail" -ne 0 ]; then echo "--- gateway log"; cat "$WORK/gateway.log"; exit 1; fi
