#!/usr/bin/env bash
# Builds labvisor/supervisor:local offline: FROM scratch with the static labvisor,
# labvisor-agent and labvisor-healthcheck binaries in /labvisor/bin/.
#
#   tools/build-supervisor-image.sh [--tag IMAGE] [--label KEY=VALUE]... [-- CARGO_ARGS...]
#
# 1. cargo builds the three binaries fully static (glibc crt-static). crt-static needs an
#    explicit --target, or proc-macros are built static too and the build fails.
# 2. ldd proves they are static.
# 3. docker build with --network none on a private context (the Dockerfile of
#    images/supervisor/ and the binaries): no registry, no network.
#
# Honours CARGO_TARGET_DIR. Idempotent; the image is rebuilt every time (cheap: one layer).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=labvisor/supervisor:local
labels=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --label) labels+=(--label "$2"); shift 2 ;;
        --) shift; break ;;
        -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "build-supervisor-image: unknown argument $1" >&2; exit 2 ;;
    esac
done

target=x86_64-unknown-linux-gnu
cargo build --release --target "$target" \
    -p labvisor -p labvisor-agent -p labvisor-healthcheck \
    --config "target.$target.rustflags=[\"-C\",\"target-feature=+crt-static\"]" "$@"

out="${CARGO_TARGET_DIR:-target}/$target/release"
bins=(labvisor labvisor-agent labvisor-healthcheck)
for b in "${bins[@]}"; do
    case "$(ldd "$out/$b" 2>&1 || true)" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *) echo "build-supervisor-image: $out/$b is dynamically linked" >&2; exit 1 ;;
    esac
done

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/bin"
for b in "${bins[@]}"; do cp "$out/$b" "$ctx/bin/$b"; done
cp images/supervisor/Dockerfile "$ctx/Dockerfile"
docker build --network none -q ${labels[@]+"${labels[@]}"} -t "$tag" "$ctx" >/dev/null
echo "build-supervisor-image: built $tag"
