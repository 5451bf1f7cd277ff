#!/usr/bin/env bash
# Removes what labvisor created, and nothing else: containers, networks and (with --volumes)
# volumes labelled io.labvisor.managed-by=labvisor. Unlike the old stack's nuke scripts it never
# touches other containers, images or volumes on the host.
#
#   tools/nuke.sh [--supervisor ID] [--volumes] [--yes]
#
#   --supervisor ID  only objects of that supervisor (label io.labvisor.supervisor=ID)
#   --volumes        also the agents' volumes (their spools, logs and job state are lost)
#   --yes            really remove; without it, only list what would be removed (dry run)
#
# The compose stack itself (mosquitto, the supervisor, Portainer) is not labelled this way;
# `docker-compose -p labvisor down` removes it. Stop the supervisor first, or it re-creates its
# agents at once.
set -euo pipefail

supervisor=""
volumes=0
yes=0
while [ $# -gt 0 ]; do
    case "$1" in
        --supervisor)
            [ $# -ge 2 ] && [ -n "$2" ] || { echo "nuke.sh: --supervisor needs an id" >&2; exit 2; }
            supervisor="$2"; shift 2 ;;
        --volumes) volumes=1; shift ;;
        --yes) yes=1; shift ;;
        -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "nuke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

filters=(--filter "label=io.labvisor.managed-by=labvisor")
[ -z "$supervisor" ] || filters+=(--filter "label=io.labvisor.supervisor=$supervisor")

containers=$(docker ps -a "${filters[@]}" --format '{{.ID}} {{.Names}}')
networks=$(docker network ls "${filters[@]}" --format '{{.ID}} {{.Name}}')
vols=""
[ "$volumes" = 0 ] || vols=$(docker volume ls "${filters[@]}" --format '{{.Name}}')

scope="labvisor-managed objects"
[ -z "$supervisor" ] || scope="$scope of supervisor $supervisor"
if [ -z "$containers$networks$vols" ]; then
    echo "nuke.sh: no $scope"
    exit 0
fi

status=0
act() {
    # act KIND NAME COMMAND...
    local kind="$1" name="$2"
    shift 2
    if [ "$yes" = 0 ]; then
        echo "would remove $kind $name"
    elif "$@" >/dev/null; then
        echo "removed $kind $name"
    else
        echo "nuke.sh: could not remove $kind $name" >&2
        status=1
    fi
}

while read -r id name; do
    if [ -n "$id" ]; then act container "$name" docker rm -f "$id"; fi
done <<< "$containers"
while read -r id name; do
    if [ -n "$id" ]; then act network "$name" docker network rm "$id"; fi
done <<< "$networks"
while read -r name; do
    if [ -n "$name" ]; then act volume "$name" docker volume rm -f "$name"; fi
done <<< "$vols"

if [ "$yes" = 0 ]; then
    echo "nuke.sh: dry run over $scope; pass --yes to remove them"
fi
exit "$status"
