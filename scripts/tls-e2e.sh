#!/usr/bin/env bash
# End-to-end TLS check with Debian's mosquitto_pub / mosquitto_sub (--cafile, --cert/--key) and
# openssl against the built gateway binary: TLS delivery both ways, a wrong CA, plain MQTT on
# the TLS port, mTLS accepted and refused, a certificate reload on SIGHUP, and a listener with
# `self_signed: true` whose logged fingerprint is the one openssl computes for the certificate
# it serves, trusted by mosquitto clients as their only CA.
# Prints "N passed, N failed".
set -uo pipefail
BIN=${1:-target/debug/lmq-gateway}
[ -x "$BIN" ] || { echo "gateway binary $BIN not found (cargo build first)"; exit 2; }

WORK=$(mktemp -d)
# shellcheck source=lib/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/ports.sh"
read -r PORT TLS MTLS SELF < <(free_ports 4)
C=$WORK/certs; mkdir -p "$C"

# CA, other CA, server certificate for 127.0.0.1/localhost, client certificate.
mkca() { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$2" \
  -keyout "$C/$1.key" -out "$C/$1.pem" 2>/dev/null; }
mkleaf() { # name cn ca
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$C/$1.key" -out "$C/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > "$C/$1.ext"
  openssl x509 -req -in "$C/$1.csr" -CA "$C/$3.pem" -CAkey "$C/$3.key" -CAcreateserial -days 2 \
    -extfile "$C/$1.ext" -out "$C/$1.pem" 2>/dev/null
}
mkca ca "lmq e2e CA"; mkca other "other CA"
mkleaf server gateway-1 ca; mkleaf client GID_e2e@@@device-1 ca; mkleaf intruder GID_e2e@@@intruder other
cp "$C/server.pem" "$C/live.pem"; cp "$C/server.key" "$C/live.key"

cat > "$WORK/gateway.yaml" <<YAML
auth:
  allow_anonymous: true
  allow_plain_client_ids: true
listeners:
  - name: tcp
    bind: 127.0.0.1:$PORT
  - name: tls
    bind: 127.0.0.1:$TLS
    transport: tls
    tls:
      cert: $C/live.pem
      key: $C/live.key
      reload_interval_secs: 3600   # only SIGHUP reloads in this script
  - name: mtls
    bind: 127.0.0.1:$MTLS
    transport: tls
    tls:
      cert: $C/server.pem
      key: $C/server.key
      client_ca: $C/ca.pem
      require_client_cert: true
  - name: self-signed
    bind: 127.0.0.1:$SELF
    transport: tls
    tls:
      self_signed: true
core:
  embedded:
    data_dir: $WORK/data
log:
  level: info                      # the self-signed certificate's fingerprint is logged at INFO
YAML
"$BIN" serve -c "$WORK/gateway.yaml" >"$WORK/gateway.log" 2>&1 &
GW=$!
cleanup() { kill "$GW" 2>/dev/null; wait "$GW" 2>/dev/null; jobs -p | xargs -r kill 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$SELF) 2>/dev/null && break; sleep 0.1; done

pass=0; fail=0
check() { # name expected actual
  if [ "$2" == "$3" ]; then pass=$((pass+1)); echo "ok   $1";
  else fail=$((fail+1)); echo "FAIL $1: expected [$2] got [$3]"; fi
}
T=(-h 127.0.0.1 -p "$TLS" --cafile "$C/ca.pem")
M=(-h 127.0.0.1 -p "$MTLS" --cafile "$C/ca.pem")

# TLS subscriber receives a TCP publisher's message, and a TCP subscriber a TLS publisher's.
timeout 10 mosquitto_sub "${T[@]}" -i tls-sub -q 1 -t 'tls/#' -C 1 -v >"$WORK/sub1.txt" &
S=$!; sleep 0.5
mosquitto_pub -h 127.0.0.1 -p "$PORT" -i tcp-pub -q 1 -t tls/down -m "over tls"
wait $S
check "tcp -> tls subscriber" "tls/down over tls" "$(cat "$WORK/sub1.txt")"
timeout 10 mosquitto_sub -h 127.0.0.1 -p "$PORT" -i tcp-sub -q 1 -t 'up/#' -C 1 -v >"$WORK/sub2.txt" &
S=$!; sleep 0.5
mosquitto_pub "${T[@]}" -i tls-pub -q 1 -t up/x -m "from tls"
wait $S
check "tls publisher -> tcp" "up/x from tls" "$(cat "$WORK/sub2.txt")"

# A client trusting another CA, and a plain client on the TLS port, do not get in.
timeout 10 mosquitto_pub -h 127.0.0.1 -p "$TLS" --cafile "$C/other.pem" -i wrong-ca -t x -m x 2>/dev/null
check "wrong CA refused" "refused" "$([ $? -ne 0 ] && echo refused || echo accepted)"
timeout 10 mosquitto_pub -h 127.0.0.1 -p "$TLS" -i plain -t x -m x 2>/dev/null
check "plain MQTT on the TLS port refused" "refused" "$([ $? -ne 0 ] && echo refused || echo accepted)"

# mTLS: our client certificate works; none, or one from another CA, does not.
timeout 10 mosquitto_pub "${M[@]}" --cert "$C/client.pem" --key "$C/client.key" -i GID_e2e@@@device-1 -q 1 -t m/x -m x
check "mTLS with a valid client certificate" "0" "$?"
timeout 10 mosquitto_pub "${M[@]}" -i GID_e2e@@@nocert -q 1 -t m/x -m x 2>/dev/null
check "mTLS without a certificate refused" "refused" "$([ $? -ne 0 ] && echo refused || echo accepted)"
timeout 10 mosquitto_pub "${M[@]}" --cert "$C/intruder.pem" --key "$C/intruder.key" -i GID_e2e@@@intruder -q 1 -t m/x -m x 2>/dev/null
check "mTLS with another CA's certificate refused" "refused" "$([ $? -ne 0 ] && echo refused || echo accepted)"

# Reload on SIGHUP: new connections see the new certificate.
subject() { openssl s_client -connect "127.0.0.1:$TLS" -CAfile "$C/ca.pem" </dev/null 2>/dev/null \
  | openssl x509 -noout -subject -nameopt RFC2253 2>/dev/null; }
check "certificate before reload" "subject=CN=gateway-1" "$(subject)"
mkleaf renewed gateway-2 ca
cp "$C/renewed.pem" "$C/live.pem.new" && mv "$C/live.pem.new" "$C/live.pem"
cp "$C/renewed.key" "$C/live.key.new" && mv "$C/live.key.new" "$C/live.key"
kill -HUP "$GW"; sleep 1
check "certificate after SIGHUP" "subject=CN=gateway-2" "$(subject)"
timeout 10 mosquitto_pub "${T[@]}" -i after-reload -q 1 -t up/y -m y
check "TLS publish after reload" "0" "$?"

# Self-signed: fetch the certificate the listener serves, compare openssl's fingerprint of it
# with the one the gateway logged, then trust exactly that certificate.
openssl s_client -connect "127.0.0.1:$SELF" </dev/null 2>/dev/null | openssl x509 >"$C/self.pem" 2>/dev/null
served=$(openssl x509 -in "$C/self.pem" -noout -fingerprint -sha256 2>/dev/null | sed 's/^.*=//')
logged=$(grep -oE '([0-9A-F]{2}:){31}[0-9A-F]{2}' "$WORK/gateway.log" | head -1)
check "self-signed: logged fingerprint = served certificate's" "$served" "${logged:-none logged}"
S1=(-p "$SELF" --cafile "$C/self.pem")
timeout 10 mosquitto_sub -h localhost "${S1[@]}" -i self-sub -q 1 -t 'self/#' -C 1 -v >"$WORK/self.txt" &
S=$!; sleep 0.5
timeout 10 mosquitto_pub -h 127.0.0.1 "${S1[@]}" -i self-pub -q 1 -t self/x -m pinned
wait $S
check "self-signed: localhost and 127.0.0.1 clients trusting only it" "self/x pinned" "$(cat "$WORK/self.txt")"

if kill -0 "$GW" 2>/dev/null; then pass=$((pass+1)); echo "ok   gateway alive"; else fail=$((fail+1)); echo "FAIL gateway died"; cat "$WORK/gateway.log"; fi
echo "tls-e2e: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
