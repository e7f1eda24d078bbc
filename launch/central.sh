#!/usr/bin/env bash
# The central's host: it runs the central alone. Start it first, then launch/edge.sh on every edge
# host (in other terminals or on other machines).
#
#   launch/central.sh --hosts H     [--port 29500] [--max-restarts K] [--config FILE] [split_trainer args...]
#   launch/central.sh --hosts MIN:MAX [--port P] [--addr A] [--job ID] [--wait S] --max-restarts K ...
#   (either form) [--secret-file F]
#
# --hosts H: a fixed fleet of H edge hosts (a static rendezvous: every host must be there, and all
# restart together). --hosts MIN:MAX: an elastic fleet (docs/elastic.md): torchrun's c10d rendezvous,
# hosted here, admits 1 to MAX edge hosts; the job goes on while at least MIN are up, and a host
# that leaves or joins makes the others meet again and resume from the newest checkpoint. Give
# --max-restarts one for every edge host lost and one for every host that joins (a join can cost
# one: docs/elastic.md).
# --port: the rendezvous port on this host (edge hosts must reach it, and TensorPipe's own ports,
# on the interface they connect through). --addr: this host's address as the edge hosts reach it
# (elastic; default: its name). --job: the rendezvous id, the same on every host. --wait: seconds
# the rendezvous waits for more hosts once MIN are there (elastic; default 10).
# The job's secret (docs/hosts-and-security.md): every edge proves it holds it before it is sent
# anything. --secret-file F (made there when F does not exist), or SPLIT_TRAINER_SECRET or
# SPLIT_TRAINER_SECRET_FILE in the environment; none of these: the run folder's job.secret, made
# when there is none (mode 600). The script prints once how edge hosts join (the edge command, with
# this command's --config and arguments), never the secret.
# Set IFNAME to the interface the edge hosts reach (e.g. eth0) when this host's name resolves to
# 127.0.1.1. Any other arguments go to split_trainer, e.g. --set data.root=/data/mnist (edge
# placement needs no data here at all).
set -euo pipefail
hosts="" port=29500 restarts=0 config=configs/mnist.yaml args=() addr="" job=split_trainer wait=10 secret_file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) hosts="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --addr) addr="$2"; shift 2 ;;
    --job) job="$2"; shift 2 ;;
    --wait) wait="$2"; shift 2 ;;
    --secret-file) secret_file="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
die() { echo "launch/central.sh: error: $*" >&2; exit 2; }
# The edge command printed below carries this command's --config and split_trainer arguments, so that
# copied as printed it joins the same job (an edge host whose data.root differs changes that one).
same=" --config $(printf %q "$config")"
[ ${#args[@]} -eq 0 ] || same+=$(printf ' %q' "${args[@]}")
here="$(dirname "$0")"
edges=$(python "$here/edges_of.py" "$config" "${args[@]+"${args[@]}"}") || exit 2
if [ -n "${IFNAME:-}" ]; then export TP_SOCKET_IFNAME="$IFNAME" GLOO_SOCKET_IFNAME="$IFNAME"; fi
# The job's secret reaches torchrun's workers through the environment, never a command line (ps
# shows those to everyone). Called once the arguments are known to be good: nothing is made before.
secret() {
  if [ -n "${SPLIT_TRAINER_SECRET+set}" ]; then
    [ -z "$secret_file" ] && [ -z "${SPLIT_TRAINER_SECRET_FILE+set}" ] || \
      die "SPLIT_TRAINER_SECRET and a secret file both give the job's secret: give one"
    echo "central: the job's secret is SPLIT_TRAINER_SECRET: each edge host needs the same value in its environment" >&2
    return
  fi
  local file=()
  secret_file="${secret_file:-${SPLIT_TRAINER_SECRET_FILE:-}}"
  [ -z "$secret_file" ] || file=(--file "$secret_file")
  secret_file=$(python -m split_trainer.transport.admission "${file[@]+"${file[@]}"}" "$config" \
    "${args[@]+"${args[@]}"}") || exit 2
  export SPLIT_TRAINER_SECRET_FILE="$secret_file"
  echo "central: the job's secret is in $secret_file (readable only by you): each edge host needs a copy" >&2
}
# How edge hosts join, printed once; the secret file's path, not the secret (logs keep what is printed).
join() { echo "central: edge hosts join with: launch/edge.sh --central $1$([ -z "$secret_file" ] || \
  printf -- ' --secret-file %q' "$secret_file")$same" >&2; }
if [[ "$hosts" =~ ^([1-9][0-9]*):([1-9][0-9]*)$ ]]; then
  least="${BASH_REMATCH[1]}" most="${BASH_REMATCH[2]}"
  [ "$least" -le "$most" ] || die "--hosts $hosts: MIN is more than MAX"
  [ "$most" -le "$edges" ] || die "--hosts $hosts allows more hosts than topology.edges=$edges: every edge host runs at least one edge"
  # Ranks follow arrival under c10d: the role says who is the central. The rendezvous store stays
  # with the agents; each round's workers meet in a fresh store of their own.
  export SPLIT_TRAINER_ROLE=central TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  [ -n "$(python "$here/edges_of.py" --min "$config" "${args[@]+"${args[@]}"}")" ] || args+=(--set "topology.min_edges=$least")
  secret
  echo "central: elastic fleet of $least to $most edge host(s), rendezvous $job on port $port" >&2
  hint="${addr:-$(hostname)}:$port --hosts $hosts --node N --edges E --max-restarts $restarts --addr THEIR_ADDR"
  [ "$job" = split_trainer ] || hint+=" --job $job"
  join "$hint"
  exec torchrun --nnodes "$((least + 1)):$((most + 1))" --nproc_per_node 1 --rdzv-backend c10d \
    --rdzv-endpoint "${addr:-localhost}:$port" --rdzv-id "$job" ${addr:+--local-addr "$addr"} \
    --rdzv-conf "is_host=1,last_call_timeout=$wait,keep_alive_interval=2,keep_alive_max_attempt=3" \
    --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
fi
[[ "$hosts" =~ ^[1-9][0-9]*$ ]] || die "--hosts N (or MIN:MAX) is required: how many edge hosts will run launch/edge.sh"
[ "$hosts" -le "$edges" ] || die "--hosts $hosts is more than topology.edges=$edges: every edge host runs at least one edge"
secret
echo "central: waiting for $hosts edge host(s) with $edges edge(s) in all on port $port" >&2
join "$(hostname):$port --hosts $hosts --node N --edges E --max-restarts $restarts"
exec torchrun --nnodes "$((hosts + 1))" --node-rank 0 --nproc_per_node 1 \
  --rdzv-backend static --master-addr 127.0.0.1 --master-port "$port" \
  --max-restarts "$restarts" -m split_trainer --config "$config" "${args[@]+"${args[@]}"}"
