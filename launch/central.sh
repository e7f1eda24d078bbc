#!/usr/bin/env bash
# The central's host: it runs the central alone. Start it first, then launch/edge.sh on every edge
# host (in other terminals or on other machines).
#
#   launch/central.sh --hosts H     [--port 29500] [--max-restarts K] [--config FILE] [split_trainer args...]
#   launch/central.sh --hosts MIN:MAX [--port P] [--addr A] [--job ID] [--wait S] --max-restarts K ...
#
# --hosts H: a fixed fleet of H edge hosts (a static rendezvous: every host must be there, and all
# restart together). --hosts MIN:MAX: an elastic fleet (docs/elastic.md): torchrun's c10d rendezvous,
# hosted here, admits 1 to MAX edge hosts; the job goes on while at least MIN are up, and a host
# that leaves or joins makes the others meet again and resume from the newest checkpoint. Give
# --max-restarts enough for every edge host lost (each loss costs one).
# --port: the rendezvous port on this host (edge hosts must reach it, and TensorPipe's own ports,
# on the interface they connect through). --addr: this host's address as the edge hosts reach it
# (elastic; default: its name). --job: the rendezvous id, the same on every host. --wait: seconds
# the rendezvous waits for more hosts once MIN are there (elastic; default 10).
# Set IFNAME to the interface the edge hosts reach (e.g. eth0) when this host's name resolves to
# 127.0.1.1. Any other arguments go to split_trainer, e.g. --set data.root=/data/mnist (edge
# placement needs no data here at all).
set -euo pipefail
hosts="" port=29500 restarts=0 config=configs/mnist.yaml args=() addr="" job=split_trainer wait=10
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --addr) addr="$2"; shift 2 ;;
    --job) job="$2"; shift 2 ;;
    --wait) wait="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
die() { echo "launch/central.sh: error: $*" >&2; exit 2; }
here="$(dirname "$0")"
edges=$(python "$here/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
if [ -n "${IFNAME:-}" ]; then export TP_SOCKET_IFNAME="$IFNAME" GLOO_SOCKET_IFNAME="$IFNAME"; fi
if [[ "$hosts" =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]]; then
  least="${BASH_REMATCH[1]}" most="${BASH_REMATCH[2]}"
  [ "$least" -le "$most" ] || die "--hosts $hosts: MIN is more than MAX"
  [ "$most" -le "$edges" ] || die "--hosts $hosts allows more hosts than topology.edges=$edges: every edge host runs at least one edge"
  # Ranks follow arrival under c10d: the role says who is the central. The rendezvous store stays
  # with the agents; each round's workers meet in a fresh store of their own.
  export SPLIT_TRAINER_ROLE=central TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  [ -n "$(python "$here/edges_of.py" --min "$config" "${args[@]+"${args[@]}"}")" ] || args+=(--set "topology.min_edges=$least")
  echo "central: elastic fleet of $least to $most edge host(s), rendezvous $job on port $port" >&2
  exec torchrun --nnodes "$((least + 1)):$((most + 1))" --nproc_per_node 1 --rdzv-backend c10d \
    --rdzv-endpoint "${addr:-localhost}:$port" --rdzv-id "$job" ${addr:+--local-addr "$addr"} \
    --rdzv-conf "is_host=1,last_call_timeout=$wait,keep_alive_interval=2,keep_alive_max_attempt=3" \
    --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
fi
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || die "--hosts N (or MIN:MAX) is required: how many edge hosts will run launch/edge.sh"
[ "$hosts" -le "$edges" ] || die "--hosts $hosts is more than topology.edges=$edges: every edge host runs at least one edge"
echo "central: waiting for $hosts edge host(s) with $edges edge(s) in all on port $port" >&2
exec torchrun --nnodes "$((hosts + 1))" --node-rank 0 --nproc_per_node 1 \
  --rdzv-backend static --master-addr 127.0.0.1 --master-port "$port" \
  --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
