#!/usr/bin/env bash
# Several machines, static rendezvous: the central (rank 0) on node 0, edges everywhere else.
# Run this once on every node, with the same NNODES / MASTER_ADDR / MASTER_PORT and its own NODE_RANK:
#
#   NNODES=2 NODE_RANK=0 NPROC=2 MASTER_ADDR=10.0.0.1 launch/multi_node.sh --set data.root=/data/mnist  # central, edge1
#   NNODES=2 NODE_RANK=1 NPROC=2 MASTER_ADDR=10.0.0.1 launch/multi_node.sh --set data.root=/data/mnist  # edge2, edge3
#
# World size = NNODES x NPROC (a static rendezvous gives every node the same count), and it must
# equal 1 + topology.edges (3 edges in configs/mnist.yaml). Ranks are numbered node by node, so node
# 0's first process is rank 0, the central. A static rendezvous honours --node-rank; with c10d
# torchrun sorts hosts and rank 0 may land on any node (and move after a restart), so this script
# uses static.
#
# Interfaces: TensorPipe (RPC data) listens on TP_SOCKET_IFNAME, and the Gloo group that init_rpc
# creates uses GLOO_SOCKET_IFNAME. On hosts whose name resolves to 127.0.1.1 (many Debian/Ubuntu
# installs) both must name the interface that the other nodes reach, e.g. eth0, or ranks on other
# nodes try to connect to loopback.
#
# Only the central needs the data folder; edges need the code and the same config.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
: "${MASTER_PORT:=29500}" "${NPROC:=1}" "${MAX_RESTARTS:=3}" "${CONFIG:=configs/mnist.yaml}"
export TP_SOCKET_IFNAME="${TP_SOCKET_IFNAME:-${IFNAME:-eth0}}"
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-${IFNAME:-eth0}}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --rdzv-backend static --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --max-restarts "$MAX_RESTARTS" -m split_trainer --config "$CONFIG" "$@"
