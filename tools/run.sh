#!/usr/bin/env bash
# labvisor's main job: the supervisor on the SUT files in sut/, with a managed broker.
#
# On a fresh machine with Docker it installs what is missing (mosquitto, busybox-static from
# Debian), builds labvisor's static binaries and the local demo image (no registry needed), then
# runs `labvisor supervise --sut-dir sut` in the foreground. Extra arguments go to `supervise`
# (for example --broker mqtt://host:1883 to use a broker you run, or --broker-port 11883).
# Ctrl-C stops the supervisor; the agent containers keep running (tools/nuke.sh removes them).
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."
. tools/lib.sh

ensure_packages
ensure_docker
log "building the static binaries (first time: a few minutes)"
tools/build-static.sh --quiet
tools/build-images.sh busybox
target/x86_64-unknown-linux-gnu/release/labvisor check sut
log "supervising sut/ (Ctrl-C to stop; the agents keep running)"
exec target/x86_64-unknown-linux-gnu/release/labvisor supervise --sut-dir sut "$@"
