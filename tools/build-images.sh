#!/usr/bin/env bash
# Builds labvisor's local images without any registry.
#
#   tools/build-images.sh busybox   labvisor/busybox:local: a `docker import` of a rootfs made from
#                                   Debian's busybox-static (the demo SUTs' and the tests' image)
#   tools/build-images.sh supervisor labvisor/supervisor:local: FROM scratch with the three static
#                                   binaries (tools/build-supervisor-image.sh), for docker-compose.yml
#   tools/build-images.sh tf-style  labvisor/tf-style:local: busybox plus Debian's Python 3 and
#                                   OpenSSH client (a testflinger-style agent's tools, for the tests)
#   tools/build-images.sh all       busybox and tf-style (the supervisor image is built by
#                                   tools/deploy.sh)
#
# Idempotent: an image that already exists is kept unless FORCE=1.
set -euo pipefail
case "${1:-}" in
    -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac
cd "$(dirname "$0")/.."

what="${1:-all}"

# busybox_root DIR BUSYBOX: the base of both images in DIR: busybox and its applets in /bin, a
# world-writable /tmp, /root, /var/log, and root and nobody in /etc/passwd and /etc/group.
busybox_root() {
    local root=$1 bb=$2 applet
    mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/var/log"
    chmod 1777 "$root/tmp"
    cp "$bb" "$root/bin/busybox"
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
}

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
    busybox_root "$root" "$bb"
    tar -C "$root" -c . | docker import \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/bin' \
        --change 'LABEL io.labvisor.image=busybox' \
        - "$image" >/dev/null
    echo "build-images: built $image"
}

# labvisor/tf-style:local: what a testflinger-style agent uses, without a registry: busybox,
# Debian's Python 3 (with its standard library) and OpenSSH client, and the shared libraries they
# load, taken from this host (apt-get install python3 openssh-client).
build_tf_style() {
    local image=labvisor/tf-style:local
    if [ "${FORCE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
        echo "build-images: $image exists"
        return
    fi
    local py ssh=/usr/bin/ssh bb=/bin/busybox
    py=$(readlink -f /usr/bin/python3 || true)
    for f in "$py" "$ssh" "$bb"; do
        if ! [ -x "$f" ]; then
            echo "build-images: ${f:-/usr/bin/python3} is missing: apt-get install python3 openssh-client busybox-static" >&2
            exit 1
        fi
    done
    local pylib
    pylib=/usr/lib/$(basename "$py")
    local root
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    busybox_root "$root" "$bb"
    mkdir -p "$root/usr/bin" "$root/usr/lib"
    cp "$py" "$root/usr/bin/"
    ln -s "$(basename "$py")" "$root/usr/bin/python3"
    cp "$ssh" "$root/usr/bin/ssh"
    tar -C / --exclude='__pycache__' --exclude="${pylib#/}/test" --exclude="${pylib#/}/idlelib" \
        --exclude="${pylib#/}/tkinter" -c "${pylib#/}" | tar -C "$root" -x
    local f lib
    for f in "$py" "$ssh" "$pylib"/lib-dynload/*.so; do
        for lib in $(ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}'); do
            [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
        done
    done
    tar -C "$root" -c . | docker import \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/usr/bin:/bin' \
        --change 'LABEL io.labvisor.image=tf-style' \
        - "$image" >/dev/null
    echo "build-images: built $image"
}

case "$what" in
    busybox) build_busybox ;;
    tf-style) build_tf_style ;;
    supervisor) exec tools/build-supervisor-image.sh ;;
    all) build_busybox; build_tf_style ;;
    *) echo "usage: $0 [busybox|tf-style|supervisor|all]" >&2; exit 2 ;;
esac
