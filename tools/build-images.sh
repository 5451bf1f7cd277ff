#!/usr/bin/env bash
# Builds labvisor's local images without any registry.
#
#   tools/build-images.sh busybox   labvisor/busybox:local: a `docker import` of a rootfs made from
#                                   Debian's busybox-static (the demo SUTs' and the tests' image)
#   tools/build-images.sh supervisor labvisor/supervisor:local: FROM scratch with the three static
#                                   binaries (tools/build-supervisor-image.sh), for docker-compose.yml
#   tools/build-images.sh tf-style  labvisor/tf-style:local: busybox plus Debian's Python 3 and
#                                   OpenSSH client (a testflinger-style agent's tools, for the tests)
#   tools/build-images.sh swarm-node labvisor/swarm-node:local: Debian's docker.io, containerd,
#                                   runc, tini and iptables (nft) with their libraries and busybox,
#                                   unpacked with dpkg -x from `apt-get download` (Debian's mirror,
#                                   no registry): one Docker engine per privileged container, the
#                                   tests' Swarm nodes (tests/src/swarm.rs)
#   tools/build-images.sh all       busybox, tf-style and swarm-node (the supervisor image is built
#                                   by tools/deploy.sh)
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

# labvisor/swarm-node:local: a Docker engine in a privileged container, for the tests' simulated
# Swarm (tests/src/swarm.rs). Made from Debian's packages without a registry: `apt-get download`
# of docker.io, containerd, runc, tini, iptables and the libraries they load (the versions of this
# Debian release), each unpacked with `dpkg -x` (no maintainer scripts), busybox for a shell.
# The entrypoint starts dockerd on /var/run/docker.sock and tcp://0.0.0.0:2375 (no TLS: the nodes
# live on a test-created bridge network) with --icc=false, its own bridges in 10.199/16 and
# 10.200/16 (not the outer engine's 172.x pools); the node's /var/lib/docker must be a volume
# (overlay2 cannot stack on the outer engine's storage).
SWARM_NODE_PACKAGES=(docker.io containerd runc tini iptables libxtables12 libnftnl11 libmnl0
    libip4tc2 libip6tc2 libnetfilter-conntrack3 libnfnetlink0 libc6 libsystemd0 libdevmapper1.02.1
    libcap2 libgcrypt20 liblzma5 libzstd1 liblz4-1 libselinux1 libudev1 libgpg-error0 libpcre2-8-0
    libseccomp2 busybox-static)

# Bumped when the node image changes, so an image built by an older version is rebuilt.
SWARM_NODE_VERSION=2

build_swarm_node() {
    local image=labvisor/swarm-node:local
    local have
    have=$(docker image inspect -f '{{index .Config.Labels "io.labvisor.image-version"}}' "$image" 2>/dev/null || true)
    if [ "${FORCE:-0}" != 1 ] && [ "$have" = "$SWARM_NODE_VERSION" ]; then
        echo "build-images: $image exists"
        return
    fi
    local work
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    mkdir -p "$work/debs" "$work/root"
    chmod 755 "$work" "$work/debs"
    # apt-get download writes as _apt when it can: give it the directory.
    chown _apt "$work/debs" 2>/dev/null || true
    if ! (cd "$work/debs" && apt-get download -q "${SWARM_NODE_PACKAGES[@]}" >/dev/null 2>&1); then
        # A fresh machine has no package lists yet, or old ones.
        apt-get update -qq
        (cd "$work/debs" && apt-get download -q "${SWARM_NODE_PACKAGES[@]}" >/dev/null)
    fi
    local deb pids=()
    for deb in "$work"/debs/*.deb; do
        dpkg -x "$deb" "$work/root" & pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    local root=$work/root applet
    # What a node never runs: the other shims, debugging tools, the CLI (the tests use the
    # host's, over tcp), documentation.
    rm -rf "$root/usr/share" "$root/usr/bin/ctr" "$root/usr/bin/dnet" "$root/usr/sbin/ovrouter" \
        "$root/usr/bin/containerd-shim" "$root/usr/bin/containerd-shim-runc-v1" "$root/usr/bin/docker"
    for applet in $("$root/bin/busybox" --list); do
        [ -e "$root/bin/$applet" ] || [ -e "$root/usr/bin/$applet" ] || [ -e "$root/usr/sbin/$applet" ] \
            || ln -s busybox "$root/bin/$applet"
    done
    # iptables through nf_tables, as Debian's alternatives choose by default.
    local t
    for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
        ln -sf "${t/tables/tables-nft}" "$root/usr/sbin/$t"
    done
    mkdir -p "$root/etc/docker" "$root/tmp" "$root/run" "$root/var/lib/docker" "$root/root" \
        "$root/usr/local/bin"
    chmod 1777 "$root/tmp"
    ln -sfn ../run "$root/var/run"
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\ndocker:x:999:\nnogroup:x:65534:\n' > "$root/etc/group"
    cat > "$root/usr/local/bin/swarm-node" <<'SH'
#!/bin/sh
# labvisor/swarm-node:local: one Docker engine, on the unix socket and on tcp 2375 (tests only).
# Not privileged (this engine's bounding set may lack a capability, and --privileged asks for
# all): the node runs with every capability it can have and unconfined, and makes /sys and its
# cgroups writable itself, so that its engine can make cgroups below its own.
mount -o remount,rw /sys 2>/dev/null || true
for d in /sys/fs/cgroup /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d" 2>/dev/null || true; done
mount --make-rshared / 2>/dev/null || true
rm -f /run/docker.pid /run/docker/containerd/containerd.pid
# A task never reaches an engine's unauthenticated API (this node's or another's): what comes
# from this node's bridges (10.199/16, 10.200/16) to port 2375 is dropped before routing.
for net in 10.199.0.0/16 10.200.0.0/16; do
    iptables -t mangle -A PREROUTING -s "$net" -p tcp --dport 2375 -j DROP
done
exec dockerd --host=unix:///var/run/docker.sock --host=tcp://0.0.0.0:2375 --tls=false \
    --icc=false --storage-driver=overlay2 --mtu="${SWARM_NODE_MTU:-1400}" \
    --bip=10.199.0.1/24 --default-address-pool=base=10.200.0.0/16,size=24 "$@"
SH
    chmod 755 "$root/usr/local/bin/swarm-node"
    tar -C "$root" -c . | docker import \
        --change 'ENTRYPOINT ["/usr/local/bin/swarm-node"]' \
        --change 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'VOLUME /var/lib/docker' \
        --change 'LABEL io.labvisor.image=swarm-node' \
        --change "LABEL io.labvisor.image-version=$SWARM_NODE_VERSION" \
        - "$image" >/dev/null
    echo "build-images: built $image"
}

case "$what" in
    busybox) build_busybox ;;
    tf-style) build_tf_style ;;
    swarm-node) build_swarm_node ;;
    supervisor) exec tools/build-supervisor-image.sh ;;
    all) build_busybox; build_tf_style; build_swarm_node ;;
    *) echo "usage: $0 [busybox|tf-style|swarm-node|supervisor|all]" >&2; exit 2 ;;
esac
