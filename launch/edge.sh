#!/usr/bin/env bash
# An edge host: joins the central started by launch/central.sh and runs this host's edges.
#
#   launch/edge.sh --central HOST[:PORT] --hosts H --node N --edges E [--max-restarts K] [--config FILE] [args...]
#
# --hosts: how many edge hosts join in all (as given to launch/central.sh); --node: this host's
# number, 1..H (each edge host its own); --edges: how many edges this host runs.
# Edges are numbered host by host: node 1's edges come first (edge1..edgeE), then node 2's.
# Use the same config and --max-restarts as the central; --set data.root=DIR names this host's
# own data folder (edge placement). Set IFNAME as for the central.
set -euo pipefail
central="" hosts="" node="" count="" restarts=0 config=configs/mnist.yaml args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --central) central="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    --edges) count="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
die() { echo "launch/edge.sh: error: $*" >&2; exit 2; }
[ -n "$central" ] || die "--central HOST[:PORT] is required: where launch/central.sh runs"
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || die "--hosts H is required: how many edge hosts join (as given to launch/central.sh)"
[[ "$node" =~ ^[1-9][0-9]*$ ]] && [ "$node" -le "$hosts" ] || die "--node N is required: this edge host's number, 1..$hosts"
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--edges E is required: how many edges this host runs"
edges=$(python "$(dirname "$0")/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
[ "$count" -le "$edges" ] || die "--edges $count is more than topology.edges=$edges in $config: run at most $edges here"
host="${central%:*}" port=29500
if [ "$host" != "$central" ]; then port="${central##*:}"; fi
if [ -n "${IFNAME:-}" ]; then export TP_SOCKET_IFNAME="$IFNAME" GLOO_SOCKET_IFNAME="$IFNAME"; fi
exec torchrun --nnodes "$((hosts + 1))" \
  --node-rank "$node" --nproc_per_node "$count" --rdzv-backend static --master-addr "$host" --master-port "$port" \
  --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
