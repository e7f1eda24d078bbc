#!/usr/bin/env bash
# An edge host: joins the central started by launch/central.sh and runs this host's edges.
#
#   launch/edge.sh --central HOST[:PORT] --hosts H --node N --edges E [--max-restarts K] [--config FILE] [args...]
#   launch/edge.sh --central HOST[:PORT] --hosts MIN:MAX --node N --edges E [--first F] [--addr A] [--job ID] ...
#   (either form) [--secret-file F]
#
# --hosts: as given to launch/central.sh (H: a fixed fleet; MIN:MAX: an elastic one, docs/elastic.md);
# --node: this host's number, 1..H (or 1..MAX), each edge host its own; --edges: how many edges
# this host runs. Edges are numbered host by host: node 1's edges come first (edge1..edgeE), then
# node 2's. In an elastic fleet an edge's number is its identity (its shard, its checkpoint part):
# this host runs edgeF..edge(F+E-1), F by default (N-1)*E+1 (every host running E edges); --first
# sets F. --addr: this host's address as the others reach it (elastic; default: its name).
# Use the same config, --job and --max-restarts as the central; --set data.root=DIR names this
# host's own data folder (edge placement). Set IFNAME as for the central.
# --secret-file F: this host's copy of the job's secret (launch/central.sh says where the central's
# is), or SPLIT_TRAINER_SECRET / SPLIT_TRAINER_SECRET_FILE in the environment. Without any, the edges
# use the run folder's job.secret if there is one (on the central's machine: the central's own). The
# script cannot know whether the central requires one: a central that does refuses an edge without
# it, before sending it anything, with one line on both sides that says how to give it.
set -euo pipefail
central="" hosts="" node="" count="" restarts=0 config=configs/mnist.yaml args=() first="" addr="" job=split_trainer
secret_file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --central) central="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --node) node="$2"; shift 2 ;;
    --edges) count="$2"; shift 2 ;;
    --first) first="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --addr) addr="$2"; shift 2 ;;
    --job) job="$2"; shift 2 ;;
    --secret-file) secret_file="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
die() { echo "launch/edge.sh: error: $*" >&2; exit 2; }
[ -n "$central" ] || die "--central HOST[:PORT] is required: where launch/central.sh runs"
[[ "$hosts" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--hosts H (or MIN:MAX) is required: as given to launch/central.sh"
most="${hosts#*:}"
[[ "$node" =~ ^[1-9][0-9]*$ ]] && [ "$node" -le "$most" ] || die "--node N is required: this edge host's number, 1..$most"
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--edges E is required: how many edges this host runs"
here="$(dirname "$0")"
edges=$(python "$here/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
[ "$count" -le "$edges" ] || die "--edges $count is more than topology.edges=$edges in $config: run at most $edges here"
if [ -n "$secret_file" ]; then  # to the workers by the environment, never a command line (ps shows those)
  [ -z "${SPLIT_TRAINER_SECRET+set}" ] || \
    die "--secret-file and SPLIT_TRAINER_SECRET both give the job's secret: give one"
  [ -f "$secret_file" ] && [ -r "$secret_file" ] || \
    die "--secret-file $secret_file: no such readable file (a copy of the central's job secret)"
  export SPLIT_TRAINER_SECRET_FILE="$secret_file"
fi
host="${central%:*}" port=29500
if [ "$host" != "$central" ]; then port="${central##*:}"; fi
if [ -n "${IFNAME:-}" ]; then export TP_SOCKET_IFNAME="$IFNAME" GLOO_SOCKET_IFNAME="$IFNAME"; fi
if [ "$hosts" != "$most" ]; then
  least="${hosts%%:*}"
  first="${first:-$(( (node - 1) * count + 1 ))}"
  [[ "$first" =~ ^[1-9][0-9]*$ ]] && [ "$((first + count - 1))" -le "$edges" ] || \
    die "edges $first..$((first + count - 1)) of this host are not all within topology.edges=$edges: set --first"
  export SPLIT_TRAINER_ROLE=edge TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  SPLIT_TRAINER_EDGES=$(seq -s, "$first" "$((first + count - 1))"); export SPLIT_TRAINER_EDGES
  [ -n "$(python "$here/edges_of.py" --min "$config" "${args[@]+"${args[@]}"}")" ] || args+=(--set "topology.min_edges=$least")
  exec torchrun --nnodes "$((least + 1)):$((most + 1))" --nproc_per_node "$count" --rdzv-backend c10d \
    --rdzv-endpoint "$host:$port" --rdzv-id "$job" ${addr:+--local-addr "$addr"} \
    --rdzv-conf "is_host=0,keep_alive_interval=2,keep_alive_max_attempt=3" \
    --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
fi
exec torchrun --nnodes "$((hosts + 1))" \
  --node-rank "$node" --nproc_per_node "$count" --rdzv-backend static --master-addr "$host" --master-port "$port" \
  --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
