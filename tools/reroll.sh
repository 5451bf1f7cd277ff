#!/usr/bin/env bash
# Starts labvisor's stack afresh: stops the compose stack, removes the agents of its supervisor
# (tools/nuke.sh --yes, labelled objects only, never the rest of the host), rebuilds the images
# and deploys again (tools/deploy.sh).
#
#   tools/reroll.sh [--volumes] [--portainer]
#
#   --volumes    also remove the agents' volumes (spools, logs, job state)
#   --portainer  deploy Portainer too
#
# Only the stack's own supervisor is touched: its id is $LABVISOR_ID, default `labvisor`, as in
# docker-compose.yml.
set -euo pipefail
cd "$(dirname "$0")/.."

nuke_args=(--yes --supervisor "${LABVISOR_ID:-labvisor}")
deploy_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --volumes) nuke_args+=(--volumes); shift ;;
        --portainer) deploy_args+=(--portainer); shift ;;
        -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "reroll.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

read -r -a compose <<< "$(tools/ensure-compose.sh)"
# The supervisor first, or it re-creates the agents nuke removes. The password is not needed
# to stop the stack, but compose interpolates the whole file.
LABVISOR_MQTT_PASSWORD="${LABVISOR_MQTT_PASSWORD:-unused}" \
    "${compose[@]}" -p labvisor --profile portainer down --remove-orphans
tools/nuke.sh "${nuke_args[@]}"
tools/deploy.sh ${deploy_args[@]+"${deploy_args[@]}"}
