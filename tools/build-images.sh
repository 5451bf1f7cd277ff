#!/usr/bin/env bash
# Builds labvisor's local images without any registry.
#
#   tools/build-images.sh busybox   labvisor/busybox:local: a `docker import` of a rootfs made from
#                                   Debian's busybox-static (the demo SUTs' and the tests' image)
#   tools/build-images.sh supervisor labvisor/supervisor:local: FROM scratch with the three static
#                                   binaries (tools/build-supervisor-image.sh), for docker-compose.yml
#   tools/build-images.sh all       busybox (the supervisor image is built by tools/deploy.sh)
#
# Idempotent: an image that already exists is kept unless FORCE=1.
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."

what="${1:-all}"

build_busybox() {
    local image=labvisor/busybox:local
    if [ "${FORCE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
        echo "build-images: $image exists"
        return
    fi
    local bb=/bin/busybox
    if ! [ -x "$bb" ] || ! "$bb" --list >/dev/null 2>&1; then
        echo "build-images: $bb is missing: apt-get install busybox-static" >&2
        exit 1
    fi
    local root
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/var/log"
    chmod 1777 "$root/tmp"
    cp "$bb" "$root/bin/busybox"
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
    tar -C "$root" -c . | docker import \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/bin' \
        --change 'LABEL io.labvisor.image=busybox' \
        - "$image" >/dev/null
    echo "build-images: built $image"
}

case "$what" in
    busybox) build_busybox ;;
    supervisor) exec tools/build-supervisor-image.sh ;;
    all) build_busybox ;;
    *) echo "usage: $0 [busybox|supervisor|all]" >&2; exit 2 ;;
esac
