#!/usr/bin/env bash
# One machine: 1 central + N edges, restarted by torchrun from the newest checkpoint if a rank dies.
#   launch/single_node.sh [--max-restarts K] [--config FILE] [split_trainer args...]
# e.g. launch/single_node.sh --max-restarts 2 --set data.root=../shared/data/mnist
set -euo pipefail
restarts=3
config=configs/mnist.yaml
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
# World size = 1 + topology.edges, read from the resolved config (file + overrides).
edges=$(python "$(dirname "$0")/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
nproc=$((edges + 1))
# --standalone: a private c10d rendezvous on a free local port.
exec torchrun --standalone --nproc_per_node "$nproc" --max-restarts "$restarts" \
  -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
