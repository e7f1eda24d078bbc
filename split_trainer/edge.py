"""The edge rank: hosts one replica of the plan's edge segments behind an RRef and serves the
central's RPCs.

The functions at module level are what the central calls with ``rpc_async``; each takes the
host's RRef and runs under its lock, so a forward never overlaps a step.
"""

from __future__ import annotations

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
from .config import Config, ModelConfig, TrainConfig
from .metrics import resident_bytes
from .plan import build_plan
from .schedule import Hop, Side
from .topology import Topology, init_rpc

_finished = threading.Event()
_last_seen = [time.monotonic()]  # the last time the central called us


class EdgeHost:
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, state: dict[str, torch.Tensor]):
        rng = torch.get_rng_state()  # building the plan seeds the RNG; this edge keeps its own stream
        self.side = Side(build_plan(model_cfg, 0).on("edge"), train_cfg)
        torch.set_rng_state(rng)
        self.side.load_state_dict(state)
        self.lock = threading.Lock()


def _host(rref: rpc.RRef) -> EdgeHost:
    _last_seen[0] = time.monotonic()
    return rref.local_value()


def run(rref: rpc.RRef, work: list[tuple[Hop, Optional[torch.Tensor]]], labels: Optional[torch.Tensor],
        lr: float) -> tuple[Optional[torch.Tensor], Any]:
    """Run the hops in ``work`` in order, each on its own input; reply with the last one's result.
    With the autograd engine this runs inside the caller's distributed-autograd context."""
    host = _host(rref)
    out, stat = None, None
    evaluating = any(hop.kind in ("infer", "score") for hop, _ in work)
    faults.hit("eval" if evaluating else "train")
    with host.lock:
        if evaluating:
            host.side.train(False)
        try:
            for hop, tensor in work:
                out, stat = host.side.run(hop, tensor, labels, lr)
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


def export_state(rref: rpc.RRef) -> dict:
    """Everything a checkpoint needs from this edge (the reply is pickled, so no aliasing)."""
    host = _host(rref)
    faults.hit("export")
    with host.lock:
        return {"module": host.side.state_dict(), "optimizers": host.side.optimizer_states(),
                "rng": torch.get_rng_state()}


def import_state(rref: rpc.RRef, state: dict) -> None:
    host = _host(rref)
    with host.lock:
        host.side.load_state_dict(state["module"])
        host.side.load_optimizer_states(state["optimizers"])
        torch.set_rng_state(state["rng"])


def describe(rref: rpc.RRef) -> str:
    """Where this edge runs, for the central's banner and table (once its segments are built)."""
    _host(rref)
    return f"{socket.gethostname()} pid {os.getpid()}"


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
    init_rpc(topo, cfg)
    _last_seen[0] = time.monotonic()
    poll = min(5.0, cfg.rpc.timeout_s)
    while not _finished.wait(poll):
        silent = time.monotonic() - _last_seen[0]
        if silent > cfg.rpc.timeout_s:
            raise TimeoutError(f"no call from the central for {silent:.0f} s (rpc.timeout_s={cfg.rpc.timeout_s:g})")
    rpc.shutdown(graceful=True)
