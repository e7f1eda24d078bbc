"""The edge rank: hosts one replica of the plan's edge segments behind an RRef and serves the
central's RPCs.

The functions at module level are what the central calls with ``rpc_async``; each takes the
host's RRef and runs under its lock, so a forward never overlaps a step.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
import warnings
from typing import Any, Optional

import torch
from torch.distributed import rpc

from . import faults
from .config import Config
from .datasets import load
from .metrics import resident_bytes
from .plan import plan_for
from .schedule import Hop, Side, from_wire, to_wire
from .shards import Draw, Shard
from .topology import Topology, device_for, init_rpc

_finished = threading.Event()
_last_seen = [time.monotonic()]  # the last time the central called us
_data: list = []  # edge placement: (train, test, spec) as found at this host's data.root, loaded before RPC


class EdgeHost:
    """This edge's replica of the plan's edge segments, and in edge placement its shard of the data.
    ``cfg`` is the central's config: it decides everything but where this host's data lies."""

    def __init__(self, cfg: Config, state: dict[str, torch.Tensor]):
        rng = torch.get_rng_state()  # building the plan seeds the RNG; this edge keeps its own stream
        device = device_for(cfg.train.edge_device, "train.edge_device", int(os.environ.get("LOCAL_RANK", "0")))
        self.side = Side(plan_for(cfg, 0).on("edge"), cfg.train, device)
        torch.set_rng_state(rng)
        self.side.load_state_dict(state)
        self.wire = getattr(torch, cfg.rpc.activation_dtype)
        self.lock = threading.Lock()
        self.labels: Optional[torch.Tensor] = None  # edge placement: the labels of the batch in flight
        self.shard: Optional[Shard] = None
        self.classes = 0
        if cfg.data.placement == "edge":
            if not _data:
                raise RuntimeError("this edge loaded no data: start it with data.placement=edge, as the central")
            train, test = (s if limit is None else s.subset(torch.arange(min(limit, len(s)))) for s, limit in
                           zip(_data[:2], (cfg.data.limit_train, cfg.data.limit_test)))
            self.classes = _data[2].classes
            rank, edges = rpc.get_worker_info().id, cfg.topology.edges
            self.shard = Shard.carve(train, test, rank, edges, cfg.data, cfg.train.seed)
        self.served: tuple[int, int] = (0, 0)  # (epoch, next batch) of this edge's own training data


def _host(rref: rpc.RRef) -> EdgeHost:
    _last_seen[0] = time.monotonic()
    return rref.local_value()


def run(rref: rpc.RRef, work: list[tuple[Hop, Any]], labels: Optional[torch.Tensor],
        lr: float) -> tuple[Optional[torch.Tensor], Any]:
    """Run the hops in ``work`` in order, each on its own input (a tensor, or a draw of this edge's
    own batch); reply with the last one's result. With the autograd engine this runs inside the
    caller's distributed-autograd context."""
    host = _host(rref)
    out, stat = None, None
    evaluating = any(hop.kind in ("infer", "score") for hop, _ in work)
    faults.hit("eval" if evaluating else "train")
    with host.lock:
        if evaluating:
            host.side.train(False)
        try:
            for hop, tensor in work:
                drawn = None
                if isinstance(tensor, Draw):
                    draw = tensor
                    tensor, host.labels = host.shard.draw(draw)
                    drawn = host.labels if draw.labels else None  # the loss is on the central
                    if draw.split == "train":
                        host.served = (draw.epoch, draw.index + 1)
                elif tensor is not None and hop.arrives()[1] is not None:
                    tensor = from_wire(tensor)
                out, stat = host.side.run(hop, tensor, labels if labels is not None else host.labels, lr)
                if out is not None:  # activations and gradients as the wire type; a loss as it is
                    out = to_wire(out, host.wire if hop.leaves() is not None else out.dtype)
                stat = drawn if drawn is not None else stat
        finally:
            if evaluating:
                host.side.train(True)
    return out, stat


def apply_step(rref: rpc.RRef, context_id: int, lr: float) -> None:
    host = _host(rref)
    with host.lock:
        host.side.step_from_context(context_id, lr)


def get_state(rref: rpc.RRef) -> dict[str, torch.Tensor]:
    host = _host(rref)
    faults.hit("sync")
    with host.lock:
        return host.side.state_dict()


def set_state(rref: rpc.RRef, state: dict[str, torch.Tensor]) -> None:
    host = _host(rref)
    with host.lock:
        host.side.load_state_dict(state)


def _data_state(host: EdgeHost) -> dict:
    shard = host.shard
    return {} if shard is None else {"epoch": host.served[0], "next_batch": host.served[1],
                                     "train_samples": len(shard.train), "test_samples": len(shard.test)}


def export_state(rref: rpc.RRef) -> dict:
    """Everything a checkpoint needs from this edge (the reply is pickled, so no aliasing): its
    segments, optimizers and RNG, and in edge placement its position in its own shard."""
    host = _host(rref)
    faults.hit("export")
    with host.lock:
        return {"module": host.side.state_dict(), "optimizers": host.side.optimizer_states(),
                "rng": host.side.rng_state(), "data": _data_state(host)}


def import_state(rref: rpc.RRef, state: dict) -> None:
    host = _host(rref)
    with host.lock:
        saved, now = state.get("data", {}), _data_state(host)
        for key in ("train_samples", "test_samples"):
            if saved.get(key) != now.get(key):
                raise RuntimeError(f"this edge's shard has {now.get(key)} {key.split('_')[0]} samples, the checkpoint "
                                   f"{saved.get(key)}: the data at its data.root changed; resume with the same data")
        host.side.load_state_dict(state["module"])
        host.side.load_optimizer_states(state["optimizers"])
        host.side.set_rng_state(state["rng"])
        host.served = (saved.get("epoch", 0), saved.get("next_batch", 0))


def describe(rref: rpc.RRef) -> dict:
    """Where this edge runs and, in edge placement, its shard's sizes and label counts (once its
    segments are built): for the central's banner, table and partition.json."""
    host = _host(rref)
    return {"host": f"{socket.gethostname()} pid {os.getpid()}", "threads": torch.get_num_threads(),
            "device": str(host.side.device), "shard": host.shard.describe(host.classes) if host.shard else None}


def rss(rref: rpc.RRef) -> int:
    """Resident memory of this edge process, in bytes."""
    _host(rref)
    return resident_bytes()


def finish() -> None:
    _finished.set()


def serve(topo: Topology, cfg: Config) -> None:
    """Serve RPCs until the central says the job is done; give up if it falls silent."""
    torch.manual_seed(cfg.train.seed + topo.rank)
    # An edge prints only warnings and errors, each on one line under its own name.
    warnings.showwarning = lambda message, category, *_args, **_kw: print(
        f"split_trainer: [{topo.name}] warning: {category.__name__}: {message}", file=sys.stderr, flush=True)
    if cfg.data.placement == "edge":  # a missing or broken data folder fails here, before RPC
        _data[:] = load(dataclasses.replace(cfg.data, limit_train=None, limit_test=None))
    init_rpc(topo, cfg)
    _last_seen[0] = time.monotonic()
    poll = min(5.0, cfg.rpc.timeout_s)
    while not _finished.wait(poll):
        silent = time.monotonic() - _last_seen[0]
        if silent > cfg.rpc.timeout_s:
            raise TimeoutError(f"no call from the central for {silent:.0f} s (rpc.timeout_s={cfg.rpc.timeout_s:g})")
    rpc.shutdown(graceful=True)
