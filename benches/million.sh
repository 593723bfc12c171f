#!/usr/bin/env bash
# A million idle plain WebSocket sessions on one machine (issue 18): many edge processes on one
# scratch Redis, many lean load-generator processes, source addresses across 127.0.0.0/8.
#
#   benches/million.sh                  # 1,000,000 sessions
#   TARGET=300000 benches/million.sh    # a smaller run
#
# It runs `cargo bench --bench idle_sessions` with RAW=1 (a load generator keeps a bare TCP
# socket per session and answers the edge's pings with an empty pong), sized so that no process
# holds more than PER_PROCESS sessions (default 18,000: this machine caps every process at
# 20,000 open files). Plain TCP only: over TLS an edge holds ~11.3 KiB per session instead of
# ~3.9, which at a million would not fit in 24 GiB next to the kernel's share.
#
# The load generators stop opening when MemAvailable falls below MIN_AVAILABLE_MIB (default
# 1536): the run then reports how far it got and why it stopped, instead of pushing the machine
# into the OOM killer. HOLD_SECS (default 65, past the edges' 60 s idle timeout) holds the
# sessions before counting how many are still open.
#
# Everything it starts runs in one process group of its own (setsid), which the trap kills on
# exit, failure or Ctrl-C: the edges, Redis, the load generators and cargo.
set -euo pipefail

sessions=${TARGET:-1000000}
# TARGET is also the bench's "run against another server" variable: it must not reach it.
unset TARGET
PER_PROCESS=${PER_PROCESS:-18000}
MIN_AVAILABLE_MIB=${MIN_AVAILABLE_MIB:-1536}
HOLD_SECS=${HOLD_SECS:-65}
PROGRESS_SECS=${PROGRESS_SECS:-10}

procs=$(((sessions + PER_PROCESS - 1) / PER_PROCESS))
EDGES=${EDGES:-$procs}
LOADGENS=${LOADGENS:-$procs}

# Each source address binds its own ephemeral ports (bind before connect), so one address gives
# at most the port range's size of connections; use at most half of it per address, to leave
# room for whatever else holds ports there.
read -r port_lo port_hi < /proc/sys/net/ipv4/ip_local_port_range
ports=$((port_hi - port_lo + 1))
per_gen=$(((sessions + LOADGENS - 1) / LOADGENS))
SOURCES=${SOURCES:-$(((per_gen + ports / 2 - 1) / (ports / 2)))}
if ((SOURCES < 4)); then SOURCES=4; fi
if ((SOURCES > 250)); then SOURCES=250; fi
if ((LOADGENS > 250)); then
    echo "million.sh: $LOADGENS load generators; source addresses 127.0.<1+n>.x allow 250" >&2
    exit 1
fi

nofile=$(ulimit -n)
if [[ $nofile != unlimited ]] && ((nofile < PER_PROCESS + 500)); then
    echo "million.sh: ulimit -n is $nofile; PER_PROCESS=$PER_PROCESS needs $((PER_PROCESS + 500))" >&2
    exit 1
fi

cd "$(dirname "$0")/.."
echo "== million.sh: $sessions sessions, $EDGES edges on one Redis, $LOADGENS load generators," \
    "$SOURCES source addresses each"
echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
    "$(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) RAM," \
    "MemAvailable $(awk '/MemAvailable/ {printf "%d MiB", $2 / 1024}' /proc/meminfo)," \
    "ulimit -n $nofile, ports $port_lo-$port_hi, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"

# Build first, outside the timed run.
cargo bench --locked --bench idle_sessions --no-run

group=
# shellcheck disable=SC2317  # called from the traps below
cleanup() {
    trap - EXIT INT TERM
    if [[ -n $group ]] && kill -0 -- "-$group" 2>/dev/null; then
        echo "== million.sh: stopping process group $group" >&2
        kill -TERM -- "-$group" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 -- "-$group" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$group" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# setsid in a background job execs at once (the job is no group leader), so $! is the new
# session's id and its process group's.
SESSIONS=$sessions EDGES=$EDGES LOADGENS=$LOADGENS SOURCES=$SOURCES BUS=redis RAW=1 \
    MIN_AVAILABLE_MIB=$MIN_AVAILABLE_MIB HOLD_SECS=$HOLD_SECS PROGRESS_SECS=$PROGRESS_SECS \
    setsid cargo bench --locked --bench idle_sessions &
group=$!
status=0
wait "$group" || status=$?
echo "== million.sh: bench exited with status $status"
exit "$status"
