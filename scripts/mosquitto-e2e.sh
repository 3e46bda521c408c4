#!/usr/bin/env bash
# End-to-end check with Debian's mosquitto_pub / mosquitto_sub against the built gateway
# binary, every client authenticated in LMQ signature mode with a password computed here by
# openssl (an independent known answer for the gateway's HMAC-SHA1): QoS 0/1/2, retained
# messages, will message, persistence across kill -9, refused credentials.
# Prints "N passed, N failed".
set -uo pipefail
BIN=${1:-target/debug/lmq-gateway}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$WORK/gateway.yaml" <<YAML
listeners:
  - name: tcp
    bind: 127.0.0.1:$PORT
core:
  embedded:
    data_dir: $WORK/data
auth:
  instance_id: e2e
  allow_plain_client_ids: true
  access_keys:
    - id: e2e-key
      secret: e2e-secret
      publish: ["e2e/#"]
      subscribe: ["e2e/#"]
log:
  level: warn
YAML
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
# Signature mode: password = Base64(HMAC-SHA1(AccessKeySecret, ClientId)), computed by openssl.
pw() { printf '%s' "$1" | openssl dgst -sha1 -hmac e2e-secret -binary | base64; }
# `as <client-id>` sets C: host, port, ClientId and its signature credentials.
as() { C=("${H[@]}" -i "$1" -u 'Signature|e2e-key|e2e' -P "$(pw "$1")"); }

# QoS 0, 1, 2: a subscriber receives exactly what was published, in order.
for q in 0 1 2; do
  as "e2e-sub-$q"; timeout 10 mosquitto_sub "${C[@]}" -q "$q" -t "e2e/q$q/#" -C 3 -v >"$WORK/sub$q.txt" &
  S=$!
  sleep 0.5
  as "e2e-pub-$q"; for i in 1 2 3; do mosquitto_pub "${C[@]}" -q "$q" -t "e2e/q$q/t" -m "msg-$i"; done
  wait $S
  check "qos $q delivery" "$(printf 'e2e/q%s/t msg-1\ne2e/q%s/t msg-2\ne2e/q%s/t msg-3' $q $q $q)" "$(cat "$WORK/sub$q.txt")"
done

# Retained: a later subscriber gets the last retained message with the retain flag.
as e2e-ret; mosquitto_pub "${C[@]}" -q 1 -r -t e2e/ret/dev1 -m online
as e2e-ret-sub; got=$(timeout 10 mosquitto_sub "${C[@]}" -q 1 -t 'e2e/ret/+' -C 1 -F '%r %t %p')
check "retained on subscribe" "1 e2e/ret/dev1 online" "$got"

# Will: a client killed without DISCONNECT has its will published.
as e2e-will-watch; timeout 10 mosquitto_sub "${C[@]}" -q 1 -t 'e2e/will/#' -C 1 -v >"$WORK/will.txt" &
W=$!
sleep 0.5
as e2e-will-dev; mosquitto_sub "${C[@]}" -t e2e/none --will-topic e2e/will/dev --will-payload gone --will-qos 1 &
D=$!
sleep 0.5
kill -9 $D
wait $W
check "will on abrupt close" "e2e/will/dev gone" "$(cat "$WORK/will.txt")"

# Persistent session across a gateway crash: messages acknowledged while the device is
# offline survive kill -9 of the gateway and reach the device when it returns.
as e2e-persist; timeout 10 mosquitto_sub "${C[@]}" -c -q 1 -t 'e2e/persist/#' -C 1 >/dev/null &
P=$!
sleep 0.5
as e2e-persist-pub; mosquitto_pub "${C[@]}" -q 1 -t e2e/persist/x -m first
wait $P
as e2e-persist-pub; for i in 1 2 3; do mosquitto_pub "${C[@]}" -q 1 -t e2e/persist/x -m "offline-$i"; done
kill -9 "$GW"; wait "$GW" 2>/dev/null
"$BIN" serve -c "$WORK/gateway.yaml" >>"$WORK/gateway.log" 2>&1 &
GW=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
as e2e-persist; got=$(timeout 10 mosquitto_sub "${C[@]}" -c -q 1 -t 'e2e/persist/#' -C 3 | tr '\n' ' ')
check "offline messages survive kill -9" "offline-1 offline-2 offline-3 " "$got"

# Refused credentials: a wrong password and a topic outside the access key's permissions.
out=$(mosquitto_pub "${H[@]}" -i e2e-bad -u 'Signature|e2e-key|e2e' -P "$(pw other-id)" -t e2e/x -m no 2>&1)
case "$out" in *"not authorised"*|*"Not authorized"*|*"bad user name or password"*|*"Bad user name or password"*) pass=$((pass+1)); echo "ok   wrong signature refused";; *) fail=$((fail+1)); echo "FAIL wrong signature: [$out]";; esac
as e2e-acl-sub; timeout 5 mosquitto_sub "${C[@]}" -q 1 -t 'other/#' -C 1 -W 2 >"$WORK/acl.txt" 2>&1
case "$(cat "$WORK/acl.txt")" in *"denied"*|*"Denied"*) pass=$((pass+1)); echo "ok   subscription outside the ACL refused";; *) fail=$((fail+1)); echo "FAIL ACL: [$(cat "$WORK/acl.txt")]";; esac

# The gateway is still alive after all this.
if kill -0 "$GW" 2>/dev/null; then pass=$((pass+1)); echo "ok   gateway alive"; else fail=$((fail+1)); echo "FAIL gateway died"; cat "$WORK/gateway.log"; fi

echo "mosquitto-e2e: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
