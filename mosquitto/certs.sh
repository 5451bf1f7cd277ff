#!/usr/bin/env bash
# Makes the TLS certificates of labvisor's broker with openssl: a private CA and a server
# certificate it signs, for mosquitto's TLS listener (8883 in mosquitto.conf).
#
#   mosquitto/certs.sh [--dir DIR] [--ca-dir DIR] [--owner OWNER] [--host NAME|IP]...
#                      [--days N] [--renew]
#
# --dir DIR      what mosquitto reads (mounted at /mosquitto/config/certs by docker-compose.yml):
#                ca.crt, server.crt, server.key. Default mosquitto/certs.
# --ca-dir DIR   the CA: ca.key and ca.crt. Never mounted anywhere; keep it private (mode 0700).
#                Default mosquitto/ca.
# --owner OWNER  chowns server.key (mode 0600) to OWNER: mosquitto reads it after dropping root,
#                as its own user (1883:1883 in the eclipse-mosquitto image, `mosquitto` for
#                Debian's package; needs root). tools/deploy.sh passes --owner 1883:1883.
# --host X       one more name or address clients use to reach the broker (repeatable). The
#                certificate always covers localhost, 127.0.0.1, ::1, mosquitto (the compose
#                service), this machine's host names and the addresses `hostname -I` lists.
# --days N       validity of the server certificate (default 825; the CA gets 3650).
# --renew        issue a new server certificate even if one exists (same CA), e.g. after adding
#                a --host. Without it, existing files are kept: running it again is harmless.
#
# Clients verify the broker with ca.crt: `mosquitto_sub --cafile mosquitto/certs/ca.crt -h HOST
# -p 8883 ...`, `labvisor status --broker mqtts://HOST:8883 --ca-file mosquitto/certs/ca.crt`.
# Nothing made here is committed (.gitignore). Needs openssl (Debian: apt-get install openssl).
set -euo pipefail
umask 077
repo="$(cd "$(dirname "$0")/.." && pwd)"

dir="$repo/mosquitto/certs"
ca_dir="$repo/mosquitto/ca"
owner=""
days=825
renew=0
hosts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="$2"; shift 2 ;;
        --ca-dir) ca_dir="$2"; shift 2 ;;
        --owner) owner="$2"; shift 2 ;;
        --host) hosts+=("$2"); shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --renew) renew=1; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v openssl >/dev/null 2>&1; then
    echo "certs.sh: openssl is missing (apt-get install openssl)" >&2
    exit 1
fi

mkdir -p "$ca_dir" "$dir"
chmod 700 "$ca_dir"
# mosquitto, no longer root, must reach the files inside.
chmod 755 "$dir"

if [ ! -s "$ca_dir/ca.key" ] || [ ! -s "$ca_dir/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt" -days 3650 \
        -subj "/CN=labvisor MQTT CA $(hostname)" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 600 "$ca_dir/ca.key"
    chmod 644 "$ca_dir/ca.crt"
    renew=1
    echo "certs.sh: made the CA $ca_dir/ca.crt"
fi
cp "$ca_dir/ca.crt" "$dir/ca.crt"
chmod 644 "$dir/ca.crt"

if [ "$renew" = 0 ] && [ -s "$dir/server.crt" ] && [ -s "$dir/server.key" ]; then
    echo "certs.sh: $dir/server.crt exists, kept (--renew issues a new one)"
else
    # Subject alternative names: what clients check (the CN is ignored by modern clients).
    names=(localhost mosquitto "$(hostname)")
    fqdn="$(hostname -f 2>/dev/null || true)"
    [ -z "$fqdn" ] || names+=("$fqdn")
    addresses=(127.0.0.1 ::1)
    read -r -a found <<< "$(hostname -I 2>/dev/null || true)"
    addresses+=(${found[@]+"${found[@]}"})
    for h in ${hosts[@]+"${hosts[@]}"}; do
        if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then addresses+=("$h"); else names+=("$h"); fi
    done
    san=""
    declare -A seen=()
    for n in "${names[@]}"; do
        [ -n "$n" ] && [ -z "${seen[$n]:-}" ] || continue
        seen[$n]=1; san+="${san:+,}DNS:$n"
    done
    for a in "${addresses[@]}"; do
        [ -n "$a" ] && [ -z "${seen[$a]:-}" ] || continue
        seen[$a]=1; san+="${san:+,}IP:$a"
    done

    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    printf '%s\n' \
        "subjectAltName=$san" \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" > "$work/ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$work/server.key" -out "$work/server.csr" -subj "/CN=labvisor mosquitto" 2>/dev/null
    openssl x509 -req -in "$work/server.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$work/ext" \
        -out "$work/server.crt" 2>/dev/null
    chmod 600 "$work/server.key"
    chmod 644 "$work/server.crt"
    mv "$work/server.key" "$dir/server.key"
    mv "$work/server.crt" "$dir/server.crt"
    echo "certs.sh: issued $dir/server.crt for $san"
fi
[ -z "$owner" ] || chown "$owner" "$dir/server.key"
