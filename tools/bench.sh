#!/usr/bin/env bash
# labvisor's benchmark command: every performance figure beside its baseline, measured in the
# same run, printed as a table and written to the results section of BENCHMARKS.md.
#
#   tools/bench.sh            full run (2-core machine: under 15 minutes, plus 13.6 measured for
#                             the 500-SUT group)
#   tools/bench.sh --quick    fewer and smaller runs (under 3 minutes once built)
#   tools/bench.sh --only output-throughput [--only ...]   some figures; BENCHMARKS.md untouched
#   tools/bench.sh --only scale-500 [--scale-n N]          the 500-SUT group alone (N SUTs)
#   tools/bench.sh --only broker-1000                      the broker's load for 1000 agents over
#                                                          10 hosts (about 4 min; needs no Docker)
#   tools/bench.sh --only swarm-50                         50 SUTs on a simulated 3-node swarm
#                                                          against a `docker service create`
#                                                          loop (2-core machine: about 4 minutes)
#   tools/bench.sh --no-write | --note TEXT                see bench/run.py --help
#
# The scale-500 and swarm-50 groups run in the full run only (a quick run leaves them out unless
# named with --only). The swarm-50 group's driver is supervisor/examples/swarm_cold_start.rs
# (its swarm is node containers with an engine each, labvisor/swarm-node:local, built here;
# removed by the driver's own label when it ends). It builds the static supervisor, agent,
# healthcheck and boot binary (tools/build-static.sh), the
# cold-start baseline's bollard loop (supervisor/examples/bollard_loop.rs) and the local busybox
# image (and, for the scale-500 group's Python baseline, labvisor/tf-style:local)
# (tools/build-images.sh), makes a Python venv with paho-mqtt for the baselines
# under the cargo target dir, starts a private mosquitto on a free port, and runs bench/run.py.
# On exit, also on failure or Ctrl-C, it stops that mosquitto, removes every Docker container,
# volume and network labelled io.labvisor.bench.run=<this run's id>, and deletes its scratch
# directory. Nothing is timed-asserted: the command reports figures, it does not judge them.
# The broker-1000 group (full run, or named) also builds supervisor/examples/broker_load, which
# starts its own mosquitto per run; this script raises the open-files limit (ulimit -n) to the
# hard limit for it, and with --only broker-1000 alone, Docker is neither needed nor touched.
set -euo pipefail
quick=0 only="" scale=0 swarm=0 prev="" docker_needed=0
for a in "$@"; do
    case "$a" in
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        --quick) quick=1 ;;
        --only=*) only=1; [ "${a#--only=}" != scale-500 ] || scale=1; [ "${a#--only=}" != swarm-50 ] || swarm=1
                  [ "${a#--only=}" = broker-1000 ] || docker_needed=1 ;;
        --only) only=1 ;;
        scale-500) [ "$prev" != --only ] || scale=1 ;;
        swarm-50) [ "$prev" != --only ] || swarm=1 ;;
    esac
    if [ "$prev" = --only ] && [ "$a" != broker-1000 ]; then docker_needed=1; fi
    prev=$a
done
if [ -z "$only" ]; then docker_needed=1; fi
# The scale-500 group (and its Python baseline's image) and the swarm-50 group (its node image
# and driver) run in a full run, or when named.
if [ -z "$only" ] && [ "$quick" = 0 ]; then scale=1; swarm=1; fi

cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '== bench.sh: %s\n' "$*" >&2; }

PAHO_VERSION=2.2.0
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin_dir=$target_dir/x86_64-unknown-linux-gnu/release
venv=$target_dir/bench-venv
run_id="lvb-$(date +%Y%m%d%H%M%S)-$$"
label="io.labvisor.bench.run=$run_id"
work=""
mosquitto_pid=""
py_pid=""

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$py_pid" ] && kill -0 "$py_pid" 2>/dev/null; then
        kill -TERM "$py_pid" 2>/dev/null || true
        wait "$py_pid" 2>/dev/null || true
    fi
    if [ -n "$mosquitto_pid" ] && kill -0 "$mosquitto_pid" 2>/dev/null; then
        kill "$mosquitto_pid" 2>/dev/null || true
        wait "$mosquitto_pid" 2>/dev/null || true
    fi
    if command -v docker >/dev/null 2>&1; then
        local ids=()
        mapfile -t ids < <(docker ps -aq --filter "label=$label" 2>/dev/null || true)
        [ ${#ids[@]} -eq 0 ] || docker rm -f -v "${ids[@]}" >/dev/null 2>&1 || true
        mapfile -t ids < <(docker volume ls -q --filter "label=$label" 2>/dev/null || true)
        [ ${#ids[@]} -eq 0 ] || docker volume rm -f "${ids[@]}" >/dev/null 2>&1 || true
        mapfile -t ids < <(docker network ls -q --filter "label=$label" 2>/dev/null || true)
        [ ${#ids[@]} -eq 0 ] || docker network rm "${ids[@]}" >/dev/null 2>&1 || true
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for p in mosquitto python3 docker /usr/bin/time; do
    if ! command -v "$p" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$p" ]; then
        echo "bench.sh: $p is missing: apt-get install mosquitto python3-venv time docker.io" >&2
        exit 1
    fi
done
if [ "$docker_needed" = 1 ]; then
    docker info >/dev/null 2>&1 || { echo "bench.sh: no Docker engine answers" >&2; exit 1; }
fi
# The broker-1000 group opens 1000 connections on each side of its mosquitto.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# 1. What is measured: the static binaries, the busybox image.
log "building the static supervisor, agent and healthcheck"
tools/build-static.sh --quiet >&2
# The cold-start baseline's minimal bollard loop, built like the static binaries (same target
# and flags, so the dependencies built for them are reused).
cargo build --quiet --release --target x86_64-unknown-linux-gnu -p labvisor --example bollard_loop \
    --config "target.x86_64-unknown-linux-gnu.rustflags=['-C','target-feature=+crt-static']" >&2
# The broker-1000 group's load tool, built alike.
cargo build --quiet --release --target x86_64-unknown-linux-gnu -p labvisor --example broker_load \
    --config "target.x86_64-unknown-linux-gnu.rustflags=['-C','target-feature=+crt-static']" >&2
if [ "$docker_needed" = 1 ]; then
    tools/build-images.sh busybox >&2
fi
if [ "$scale" = 1 ]; then
    tools/build-images.sh tf-style >&2
fi
if [ "$swarm" = 1 ]; then
    # The swarm-50 group's driver (on the test kit's Swarm; a debug build, it only drives and
    # polls) and its node image.
    cargo build --quiet -p labvisor --example swarm_cold_start >&2
    tools/build-images.sh swarm-node >&2
fi

# 2. The baselines' Python: a venv with a pinned paho-mqtt.
if ! "$venv/bin/python" -c "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__ != '$PAHO_VERSION')" 2>/dev/null; then
    log "preparing $venv with paho-mqtt $PAHO_VERSION"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "paho-mqtt==$PAHO_VERSION"
fi

# 3. A scratch directory on the same filesystem for every figure (removed on exit).
work=$(mktemp -d "${TMPDIR:-/tmp}/labvisor-bench.XXXXXX")

# 4. A private mosquitto on a free loopback port, with a generated config.
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=""
for _ in 1 2 3 4 5 6 7 8 9 10; do
    p=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nmax_queued_messages 10000\n' "$p" > "$work/mosquitto.conf"
    "$mosquitto_bin" -c "$work/mosquitto.conf" 2> "$work/mosquitto.log" &
    mosquitto_pid=$!
    for _ in $(seq 1 100); do
        if ! kill -0 "$mosquitto_pid" 2>/dev/null; then break; fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
        sleep 0.05
    done
    [ -n "$port" ] && break
    kill "$mosquitto_pid" 2>/dev/null || true
    wait "$mosquitto_pid" 2>/dev/null || true
    mosquitto_pid=""
done
if [ -z "$port" ]; then
    echo "bench.sh: mosquitto did not start:" >&2
    cat "$work/mosquitto.log" >&2
    exit 1
fi
log "mosquitto on 127.0.0.1:$port (pid $mosquitto_pid), run $run_id"

# 5. The figures. In the background, so that INT and TERM run the trap at once; the trap hands
# TERM on to run.py, which stops the agents and baselines it started.
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" bench/run.py \
    --root "$root" --bin-dir "$bin_dir" --python "$venv/bin/python" \
    --broker-port "$port" --run-id "$run_id" --work "$work" "$@" &
py_pid=$!
rc=0
wait "$py_pid" || rc=$?
py_pid=""
exit "$rc"
