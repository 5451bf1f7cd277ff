#!/usr/bin/env bash
# Deploys labvisor's stack (docker-compose.yml) on this host.
#
#   tools/deploy.sh [--portainer] [--no-build] [--tls-host NAME]...
#
# 1. Makes sure a Docker Compose CLI is there (tools/ensure-compose.sh).
# 2. Builds the local images offline: labvisor/busybox:local (the demo SUTs' image) and
#    labvisor/supervisor:local (FROM scratch with the static binaries), and, when
#    eclipse-mosquitto:2 is neither here nor pullable, a stand-in for it from Debian's mosquitto
#    (tools/build-mosquitto-image.sh). --no-build skips this.
# 3. Creates the broker's users with mosquitto/passwd.sh (role users and one per sut/*.toml;
#    existing users are kept) and its TLS certificate with mosquitto/certs.sh (a private CA in
#    mosquitto/ca/, the broker's files in mosquitto/certs/; existing ones are kept, except that
#    --tls-host NAME reissues the certificate with that name or address of this host), and
#    gives the password file and the TLS key to the image's mosquitto user.
# 4. `up -d` as compose project `labvisor`, with the supervisor's MQTT password from
#    mosquitto/secrets/labvisor.supervisor. --portainer adds Portainer (profile portainer).
#    Plain MQTT is published on 127.0.0.1:1883 only, MQTT over TLS on every interface (8883):
#    LABVISOR_MQTT_PORT and LABVISOR_MQTTS_PORT move them.
set -euo pipefail
cd "$(dirname "$0")/.."

portainer=0
build=1
tls_hosts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --portainer) portainer=1; shift ;;
        --no-build) build=0; shift ;;
        --tls-host) tls_hosts+=(--renew --host "$2"); shift 2 ;;
        -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "deploy.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

read -r -a compose <<< "$(tools/ensure-compose.sh)"

if [ "$build" = 1 ]; then
    tools/build-images.sh busybox
    tools/build-supervisor-image.sh
    broker_image="${LABVISOR_MOSQUITTO_IMAGE:-eclipse-mosquitto:2}"
    if ! docker image inspect "$broker_image" >/dev/null 2>&1 &&
        ! docker pull -q "$broker_image" >/dev/null 2>&1; then
        echo "deploy.sh: $broker_image cannot be pulled: building a stand-in from Debian's mosquitto" >&2
        tools/build-mosquitto-image.sh --tag "$broker_image"
    fi
fi

owner=()
if [ "$(id -u)" = 0 ]; then
    owner=(--owner 1883:1883)  # the eclipse-mosquitto image's user
else
    echo "deploy.sh: not root: chown mosquitto/passwd and mosquitto/certs/server.key to 1883:1883 yourself if mosquitto cannot read them" >&2
fi
mosquitto/passwd.sh ${owner[@]+"${owner[@]}"}
mosquitto/certs.sh ${owner[@]+"${owner[@]}"} ${tls_hosts[@]+"${tls_hosts[@]}"}

secret=mosquitto/secrets/labvisor.supervisor
if [ ! -s "$secret" ]; then
    echo "deploy.sh: $secret is missing: run mosquitto/passwd.sh --regenerate labvisor.supervisor" >&2
    exit 1
fi
LABVISOR_MQTT_PASSWORD="$(cat "$secret")"
export LABVISOR_MQTT_PASSWORD

profiles=()
[ "$portainer" = 0 ] || profiles=(--profile portainer)
"${compose[@]}" -p labvisor ${profiles[@]+"${profiles[@]}"} up -d
"${compose[@]}" -p labvisor ps
