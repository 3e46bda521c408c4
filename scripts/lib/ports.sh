# shellcheck shell=bash
# free_ports N: N distinct free TCP ports on 127.0.0.1, space-separated. All N sockets are
# bound at once, so no two are the same (asking for one port at a time can return a port
# twice once the first probe socket is closed).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}
