# Shared by tools/run.sh and tools/test.sh: install what is missing on a fresh Debian machine and
# make sure a Docker engine answers. Source it; it defines functions only.

log() { printf '== %s: %s\n' "$(basename "$0")" "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: mosquitto (the broker), mosquitto-clients (mosquitto_pub/sub), busybox-static
# (the demo and test image), openssl (the TLS tests make their own CA), python3-pip (paho-mqtt
# comes from PyPI: Debian's package is 1.x), and docker.io when no Docker at all is installed.
# With --browser (tools/test.sh) also chromium, chromium-driver and procps: the test kit's headless
# browser (tests/src/browser.rs); tools/run.sh does not need them.
ensure_packages() {
    local missing=()
    if [ "${1:-}" = --browser ]; then
        command -v chromium >/dev/null 2>&1 || missing+=(chromium)
        command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
        # pgrep: the kit finds chromium's crash handlers, which leave its process group.
        command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    fi
    [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
    command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # Debian's Python 3 and OpenSSH client: the testflinger-style test image (build-images.sh).
    [ -x /usr/bin/python3 ] || missing+=(python3)
    [ -x /usr/bin/ssh ] || missing+=(openssh-client)
    python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    command -v dockerd >/dev/null 2>&1 || command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# A Docker engine that answers, starting dockerd when it is installed but not running.
ensure_docker() {
    if ! docker info >/dev/null 2>&1; then
        if command -v dockerd >/dev/null 2>&1; then
            log "starting dockerd"
            as_root sh -c 'nohup dockerd >/var/log/labvisor-dockerd.log 2>&1 &'
            for _ in $(seq 1 120); do
                docker info >/dev/null 2>&1 && break
                sleep 0.5
            done
        fi
        if ! docker info >/dev/null 2>&1; then
            echo "$(basename "$0"): no Docker engine answers and dockerd could not be started" >&2
            [ -f /var/log/labvisor-dockerd.log ] && tail -20 /var/log/labvisor-dockerd.log >&2
            exit 1
        fi
    fi
    log "docker engine $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
}
