#!/usr/bin/env bash
# Builds a local stand-in for eclipse-mosquitto:2 from Debian's mosquitto, for hosts that cannot
# pull from a registry.
#
#   tools/build-mosquitto-image.sh [--tag IMAGE] [--label KEY=VALUE]...
#
# The rootfs holds the installed mosquitto, mosquitto-clients and libmosquitto1 packages' files,
# every shared library they load (from ldd) and busybox-static (sh, grep, chown for the
# entrypoint and the healthcheck), and is `docker import`ed with the official image's conventions:
# config in /mosquitto/config/mosquitto.conf, data in /mosquitto/data, logs in /mosquitto/log,
# the user mosquitto (1883:1883) that the broker drops to, the entrypoint /docker-entrypoint.sh
# (gives /mosquitto to that user when run as root) and the command
# `/usr/sbin/mosquitto -c /mosquitto/config/mosquitto.conf`. mosquitto_pub, mosquitto_sub and
# mosquitto_passwd are on the PATH, as in the official image.
#
# Default tag eclipse-mosquitto:2, so that docker-compose.yml finds it; an image that already
# has the tag is replaced only with FORCE=1. Needs Docker, mosquitto, mosquitto-clients and
# busybox-static (apt-get install mosquitto mosquitto-clients busybox-static).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=eclipse-mosquitto:2
changes=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --label) changes+=(--change "LABEL $2"); shift 2 ;;
        -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "build-mosquitto-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "build-mosquitto-image: $tag exists (FORCE=1 replaces it)"
    exit 0
fi
for p in mosquitto mosquitto-clients libmosquitto1 busybox-static; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        echo "build-mosquitto-image: Debian package $p is missing: apt-get install $p" >&2
        exit 1
    fi
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# The packages' own files (not their docs), then the libraries every ELF file among them needs.
files=()
while read -r f; do
    case "$f" in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/*) continue ;; esac
    [ -f "$f" ] && files+=("$f")
done < <(dpkg -L mosquitto mosquitto-clients libmosquitto1)
copy() {
    mkdir -p "$root$(dirname "$1")"
    cp -L "$1" "$root$1"
}
libs=()
for f in "${files[@]}"; do
    copy "$f"
    if head -c 4 "$f" | grep -q 'ELF'; then
        while read -r lib; do libs+=("$lib"); done < <(
            ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
        )
    fi
done
for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do copy "$lib"; done

mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/var/empty" \
    "$root/mosquitto/config" "$root/mosquitto/data" "$root/mosquitto/log"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
    'mosquitto:x:1883:1883:mosquitto:/var/empty:/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/:/sbin/nologin' > "$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'mosquitto:x:1883:' 'nogroup:x:65534:' > "$root/etc/group"
# The official image's defaults: no listener configured (local only), and a no-auth example.
printf '%s\n' '# Replace this file: mount your own at /mosquitto/config/mosquitto.conf.' \
    'persistence true' 'persistence_location /mosquitto/data/' \
    'log_dest stdout' > "$root/mosquitto/config/mosquitto.conf"
printf '%s\n' 'listener 1883' 'allow_anonymous true' > "$root/mosquitto-no-auth.conf"
cat > "$root/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
# As in eclipse-mosquitto: give /mosquitto to the user mosquitto drops to (read-only mounts stay
# as they are).
if [ "$(id -u)" = '0' ]; then
    [ -d /mosquitto ] && chown -R mosquitto:mosquitto /mosquitto 2>/dev/null || true
fi
exec "$@"
EOF
chmod 755 "$root/docker-entrypoint.sh"

version=$(dpkg-query -W -f '${Version}' mosquitto)
tar -C "$root" --numeric-owner --owner=0 --group=0 -c . | docker import \
    --change 'ENTRYPOINT ["/docker-entrypoint.sh"]' \
    --change 'CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]' \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'EXPOSE 1883' \
    --change 'VOLUME ["/mosquitto/data", "/mosquitto/log"]' \
    --change "LABEL io.labvisor.image=mosquitto org.opencontainers.image.version=$version" \
    ${changes[@]+"${changes[@]}"} \
    - "$tag" >/dev/null
echo "build-mosquitto-image: built $tag (Debian mosquitto $version)"
