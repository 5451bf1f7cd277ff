#!/usr/bin/env bash
# Creates or updates labvisor's mosquitto password file with `mosquitto_passwd -b`.
#
#   mosquitto/passwd.sh [--file PASSWD] [--secrets DIR] [--sut-dir DIR] [--owner OWNER]
#                       [--regenerate] [USER[:PASSWORD]]...
#
# USER:PASSWORD  sets that user's password (avoid on shared hosts: arguments are visible in ps;
#                prefer USER alone and read the generated secret from --secrets).
# USER           generates a password for that user unless the password file already has it
#                (or --regenerate is given).
# no USER        generates the role users (labvisor.supervisor, labvisor.submit,
#                labvisor.reader) and one agent user per sut/*.toml (user name = SUT name),
#                skipping users the file already has. `labvisor` is reserved and refused.
#
# Defaults: --file mosquitto/passwd, --secrets mosquitto/secrets, --sut-dir sut (relative to the
# repository). A generated password is printed once, as `user: password`, and written to
# <secrets>/<user> (mode 0600) so that deploy tools can hand it on; given passwords are never
# printed. The password file and the secrets are mode 0600. Needs mosquitto_passwd (Debian:
# apt-get install mosquitto).
#
# mosquitto started as root reads the password file after dropping to its own user, so that user
# must own the file: --owner chowns it (1883:1883 is the user of the eclipse-mosquitto image,
# `mosquitto` the Debian package's; needs root). tools/deploy.sh passes --owner 1883:1883.
set -euo pipefail
umask 077
repo="$(cd "$(dirname "$0")/.." && pwd)"

file="$repo/mosquitto/passwd"
secrets="$repo/mosquitto/secrets"
sut_dir="$repo/sut"
regenerate=0
owner=""
users=()
while [ $# -gt 0 ]; do
    case "$1" in
        --file) file="$2"; shift 2 ;;
        --secrets) secrets="$2"; shift 2 ;;
        --sut-dir) sut_dir="$2"; shift 2 ;;
        --regenerate) regenerate=1; shift ;;
        --owner) owner="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*) echo "passwd.sh: unknown option $1" >&2; exit 2 ;;
        *) users+=("$1"); shift ;;
    esac
done

if ! command -v mosquitto_passwd >/dev/null 2>&1; then
    echo "passwd.sh: mosquitto_passwd is missing (apt-get install mosquitto)" >&2
    exit 1
fi

if [ ${#users[@]} -eq 0 ]; then
    users=(labvisor.supervisor labvisor.submit labvisor.reader)
    shopt -s nullglob
    for f in "$sut_dir"/*.toml; do
        name="$(basename "$f" .toml)"
        case "$name" in .*) continue ;; esac
        if [ "$name" = labvisor ]; then
            echo "passwd.sh: skipped $f: labvisor is reserved (the control plane's topics), not a SUT" >&2
            continue
        fi
        users+=("$name")
    done
fi

mkdir -p "$(dirname "$file")"
[ -e "$file" ] || : > "$file"
chmod 600 "$file"

has_user() { grep -q "^$1:" "$file"; }

generate() {
    # 24 random bytes, base64 without the characters shells and URLs dislike.
    head -c 24 /dev/urandom | base64 | tr -d '\n/+='
}

status=0
for entry in "${users[@]}"; do
    user="${entry%%:*}"
    if [ -z "$user" ] || [[ "$user" =~ [[:space:]+#/:] ]]; then
        echo "passwd.sh: invalid user name ${user:-<empty>} (no spaces, '+', '#', '/' or ':')" >&2
        status=1
        continue
    fi
    if [ "$user" = labvisor ]; then
        # The acl gives this login nothing: labvisor/... is the control plane, not a SUT's tree.
        echo "passwd.sh: labvisor is reserved (the control plane's topics, labvisor/...); it is not a user" >&2
        status=1
        continue
    fi
    if [ "$entry" != "$user" ]; then
        password="${entry#*:}"
        mosquitto_passwd -b "$file" "$user" "$password"
        echo "passwd.sh: set the password of $user"
        continue
    fi
    if [ "$regenerate" = 0 ] && has_user "$user"; then
        echo "passwd.sh: $user exists, kept"
        continue
    fi
    password="$(generate)"
    mosquitto_passwd -b "$file" "$user" "$password"
    mkdir -p "$secrets"
    chmod 700 "$secrets"
    printf '%s' "$password" > "$secrets/$user"
    chmod 600 "$secrets/$user"
    echo "passwd.sh: generated $user: $password (saved in $secrets/$user)"
done
chmod 600 "$file"
[ -z "$owner" ] || chown "$owner" "$file"
exit "$status"
