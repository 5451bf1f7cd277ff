#!/usr/bin/env bash
# Builds labvisor-agent and labvisor-healthcheck as fully static binaries (glibc crt-static), so
# they run inside any image: FROM scratch, busybox, Debian, Ubuntu. Same as `cargo static`. Then
# labvisor-boot (`cargo static-boot`: no libc at all), which must fit in one Swarm config
# (500 KiB).
# Output: ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/{labvisor-agent,labvisor-healthcheck,labvisor-boot}
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."
cargo static "$@"
cargo static-boot "$@"
out=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release
for b in labvisor-agent labvisor-healthcheck labvisor-boot; do
    case "$(ldd "$out/$b" 2>&1 || true)" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *) echo "build-static: $out/$b is dynamically linked" >&2; exit 1 ;;
    esac
done
# A Docker config holds at most 500 KiB: the boot binary is one.
boot_size=$(stat -c %s "$out/labvisor-boot")
if [ "$boot_size" -gt $((500 * 1024)) ]; then
    echo "build-static: $out/labvisor-boot is $boot_size bytes, more than a Swarm config holds (500 KiB)" >&2
    exit 1
fi
echo "build-static: $out/labvisor-agent $out/labvisor-healthcheck $out/labvisor-boot ($boot_size bytes) are static"
