#!/usr/bin/env bash
# Makes sure a Docker Compose CLI is installed: the `docker compose` plugin or the standalone
# `docker-compose`. If neither is, installs Debian's `docker-compose` package with apt-get.
# Prints the command to use (`docker compose` or `docker-compose`) on stdout.
#
#   compose=$(tools/ensure-compose.sh)
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac

found() {
    if docker compose version >/dev/null 2>&1; then echo "docker compose"; return 0; fi
    if command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
        echo "docker-compose"; return 0
    fi
    return 1
}

if found; then exit 0; fi

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
echo "ensure-compose: installing docker-compose" >&2
as_root apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends docker-compose >&2
if ! found; then
    echo "ensure-compose: no Docker Compose CLI after installing docker-compose" >&2
    exit 1
fi
