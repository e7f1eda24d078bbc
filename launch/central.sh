#!/usr/bin/env bash
# The central's host: node 0 of a static torchrun rendezvous, running rank 0 (the central) alone.
# Start it first, then launch/edge.sh on every edge host (in other terminals or on other machines):
#
#   launch/central.sh --hosts 2 [--port 29500] [--max-restarts K] [--config FILE] [split_trainer args...]
#
# --hosts: how many edge hosts will join. --port: the rendezvous port on this host (edge hosts must
# reach it, and TensorPipe's own ports, on the interface they connect through). Set IFNAME to the
# interface the edge hosts reach (e.g. eth0) when this host's name resolves to 127.0.1.1.
# Any other arguments go to split_trainer, e.g. --set data.root=/data/mnist (edge placement needs
# no data here at all).
set -euo pipefail
hosts="" port=29500 restarts=0 config=configs/mnist.yaml args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
die() { echo "launch/central.sh: error: $*" >&2; exit 2; }
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || die "--hosts N is required: how many edge hosts will run launch/edge.sh"
edges=$(python "$(dirname "$0")/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
[ "$hosts" -le "$edges" ] || die "--hosts $hosts is more than topology.edges=$edges: every edge host runs at least one edge"
if [ -n "${IFNAME:-}" ]; then export TP_SOCKET_IFNAME="$IFNAME" GLOO_SOCKET_IFNAME="$IFNAME"; fi
echo "central: waiting for $hosts edge host(s) with $edges edge(s) in all on port $port" >&2
exec torchrun --nnodes "$((hosts + 1))" --node-rank 0 --nproc_per_node 1 \
  --rdzv-backend static --master-addr 127.0.0.1 --master-port "$port" \
  --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
