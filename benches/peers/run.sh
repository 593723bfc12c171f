#!/usr/bin/env bash
# Side by side: the same idle-session and fan-out workloads, in one run, against
#   edgeplex (release build, one process; embedded bus, and Redis bus for the fan-out),
#   node-ws-redis: Node.js `ws` with a Redis pub/sub relay (benches/peers/node-ws-redis),
#   nats: Debian's nats-server with its WebSocket listener,
# then prints every figure for each and the ratio edgeplex/peer. Fan-out through Redis is
# compared with the Node relay (both need Redis to span nodes), the embedded bus with NATS
# (a broker of its own).
#
# Usage: benches/peers/run.sh
#   SESSIONS       idle WebSocket sessions per server and mode (default 5000)
#   SUBSCRIBERS    fan-out subscribers on one channel (default 1000)
#   RATES          fan-out messages per second, one step each (default "100 1000")
#   DURATION_SECS  seconds per fan-out step (default 5)
# Everything runs on 127.0.0.1; every server gets its own free port and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

SESSIONS=${SESSIONS:-5000}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATES=${RATES:-100 1000}
DURATION_SECS=${DURATION_SECS:-5}
export DURATION_SECS

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nats-server >/dev/null || missing+=(nats-server)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
  echo "installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || { echo "cannot install ${missing[*]}" >&2; exit 1; }
fi
(cd benches/peers/node-ws-redis && { [ -d node_modules ] || npm ci --no-audit --no-fund --silent; })
cargo bench --no-run --bench idle_sessions --bench fanout >&2

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
  -addext keyUsage=digitalSignature -addext extendedKeyUsage=serverAuth 2>/dev/null

# Records a server just started: $1 its pid, $2 its WebSocket port, $3 "tls" or "plain", $4 more
# pids to measure with it. Waits for the port; sets URL and PIDS.
started() {
  pids+=("$1")
  wait_port "$2"
  URL="$([ "$3" = tls ] && echo wss || echo ws)://localhost:$2/ws"
  PIDS="$1${4:+,$4}"
}

# Starts a scratch Redis; sets REDIS_PORT and REDIS_PID.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --client-output-buffer-limit "pubsub 0 0 0" >/dev/null &
  REDIS_PID=$!
  pids+=("$REDIS_PID")
  wait_port "$REDIS_PORT"
}

# Starts the Node relay on its own Redis; $1 is "tls" or "plain". Sets URL and PIDS.
start_node() {
  start_redis
  local port; port=$(free_port)
  local tls=(); [ "$1" = tls ] && tls=("$tmp/cert.pem" "$tmp/key.pem")
  node benches/peers/node-ws-redis/server.js "$port" "redis://127.0.0.1:$REDIS_PORT" "${tls[@]}" >/dev/null &
  started $! "$port" "$1" "$REDIS_PID"
}

# Starts nats-server with a WebSocket listener; $1 is "tls" or "plain". Sets URL and PIDS.
start_nats() {
  local port wsport; port=$(free_port); wsport=$(free_port)
  local tlsconf='no_tls: true'
  [ "$1" = tls ] && tlsconf="tls { cert_file: \"$tmp/cert.pem\", key_file: \"$tmp/key.pem\" }"
  cat >"$tmp/nats-$1.conf" <<CONF
listen: 127.0.0.1:$port
max_connections: 1000000
websocket { listen: "127.0.0.1:$wsport", $tlsconf, compression: false }
CONF
  nats-server -c "$tmp/nats-$1.conf" >/dev/null 2>&1 &
  started $! "$wsport" "$1"
}

stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

results="$tmp/results"
# run NAME WORKLOAD BENCH VAR=VALUE...: runs a bench and keeps its RESULT lines.
run() {
  local name=$1 workload=$2 bench=$3; shift 3
  echo "== $name: $workload" >&2
  local out
  out=$(env "$@" cargo bench -q --bench "$bench")
  echo "$out" >&2
  echo "$out" | sed -n "s/^RESULT [^ ]* /$name $workload /p" >>"$results"
}

for mode in plain tls; do
  extra=(); [ "$mode" = plain ] && extra=(PLAIN=1)
  run edgeplex "idle-$mode" idle_sessions SESSIONS="$SESSIONS" TRANSPORTS=websocket "${extra[@]}"
  start_node "$mode"
  run node "idle-$mode" idle_sessions SESSIONS="$SESSIONS" TARGET="$URL" TARGET_PIDS="$PIDS" TARGET_CA="$tmp/cert.pem"
  stop_all
  start_nats "$mode"
  run nats "idle-$mode" idle_sessions SESSIONS="$SESSIONS" TARGET="$URL" TARGET_PIDS="$PIDS" TARGET_CA="$tmp/cert.pem" PROTOCOL=nats
  stop_all
done
# The edgeplex idle run with PLAIN=1 also printed a TLS row first: keep the plain one only.
python3 - "$results" <<'PY'
import sys
path = sys.argv[1]
lines = open(path).read().splitlines()
out, seen = [], set()
for l in reversed(lines):
    name, workload = l.split()[:2]
    if (name, workload) in seen and workload == "idle-plain":
        continue
    seen.add((name, workload))
    out.append(l)
open(path, "w").write("\n".join(reversed(out)) + "\n")
PY

for rate in $RATES; do
  run edgeplex-embedded "fanout-$rate" fanout SUBSCRIBERS="$SUBSCRIBERS" RATE="$rate"
  run edgeplex-redis "fanout-$rate" fanout SUBSCRIBERS="$SUBSCRIBERS" RATE="$rate" BUS=redis
  start_node plain
  run node "fanout-$rate" fanout SUBSCRIBERS="$SUBSCRIBERS" RATE="$rate" TARGET="$URL" TARGET_PIDS="$PIDS"
  stop_all
  start_nats plain
  run nats "fanout-$rate" fanout SUBSCRIBERS="$SUBSCRIBERS" RATE="$rate" TARGET="$URL" TARGET_PIDS="$PIDS" PROTOCOL=nats
  stop_all
done

python3 - "$results" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    name, workload, *kv = line.split()
    rows[(name, workload)] = {k: float(v) for k, v in (x.split("=") for x in kv)}
workloads = sorted({w for _, w in rows}, key=lambda w: (w.split("-")[0], w))
# Which edgeplex run each peer is held against.
mine = lambda w, peer: "edgeplex" if w.startswith("idle") else (
    "edgeplex-redis" if peer == "node" else "edgeplex-embedded")
lower_is_better = {"kib_per_session", "loss_pct", "p50_ms", "p99_ms", "p999_ms",
                   "server_cpu_s", "server_cpu_pct"}
print()
print(f"{'workload':<16} {'figure':<17} {'edgeplex':>12} {'node-ws-redis':>14} {'nats':>12}"
      f" {'edgeplex/node':>14} {'edgeplex/nats':>14}")
for w in workloads:
    keys = []
    for (n, ww), kv in rows.items():
        if ww == w:
            keys += [k for k in kv if k not in keys]
    for k in keys:
        def val(name):
            return rows.get((name, w), {}).get(k)
        def ratio(a, b):
            if a is None or b is None:
                return "n/a"
            if b == 0:
                return "=" if a == 0 else "inf"
            r = a / b
            return f"{r:.2f}" if r >= 0.1 else f"{r:.4f}"
        e_node, e_nats = val(mine(w, "node")), val(mine(w, "nats"))
        node, nats = val("node"), val("nats")
        shown = e_node if e_node == e_nats else f"{e_node}/{e_nats}"
        print(f"{w:<16} {k:<17} {str(shown):>12} {str(node):>14} {str(nats):>12}"
              f" {ratio(e_node, node):>14} {ratio(e_nats, nats):>14}")
print()
print("Fan-out: edgeplex is shown as Redis bus/embedded bus where they differ; the Redis bus is")
print("held against node-ws-redis, the embedded bus against nats. Lower is better for memory,")
print("loss, latency and CPU; higher for rates.")
PY
