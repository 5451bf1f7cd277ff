#!/usr/bin/env bash
# Builds labvisor-agent and labvisor-healthcheck as fully static binaries (glibc crt-static), so
# they run inside any image: FROM scratch, busybox, Debian, Ubuntu. Same as `cargo static`.
# Output: ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/{labvisor-agent,labvisor-healthcheck}
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."
cargo static "$@"
out=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release
for b in labvisor-agent labvisor-healthcheck; do
    case "$(ldd "$out/$b" 2>&1 || true)" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *) echo "build-static: $out/$b is dynamically linked" >&2; exit 1 ;;
    esac
done
echo "build-static: $out/labvisor-agent $out/labvisor-healthcheck are static"
