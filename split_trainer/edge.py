"""The edge rank: hosts one replica of the edge segment behind an RRef and serves the central's RPCs.

The functions at module level are what the central calls with ``rpc_async``; each takes the
segment's RRef and runs under the segment's lock, so a forward never overlaps a step.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings

import torch
import torch.distributed.autograd as dist_autograd
from torch.distributed import rpc

from .config import Config, ModelConfig, TrainConfig
from .models import edge_segment
from .optim import make_optimizer, step_with
from .metrics import resident_bytes
from .topology import Topology, init_rpc

_finished = threading.Event()
_last_seen = [time.monotonic()]  # the last time the central called us


class EdgeSegment:
    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, state: dict[str, torch.Tensor]):
        self.module = edge_segment(model_cfg)
        self.module.load_state_dict(state)
        self.optimizer = make_optimizer(train_cfg, self.module.parameters())
        self.lock = threading.Lock()
        self.pending: torch.Tensor | None = None  # relay engine: the last activation, graph attached


def _segment(rref: rpc.RRef) -> EdgeSegment:
    _last_seen[0] = time.monotonic()
    return rref.local_value()


def train_forward(rref: rpc.RRef, x: torch.Tensor) -> torch.Tensor:
    """Forward inside the caller's distributed-autograd context (it travels with the RPC)."""
    seg = _segment(rref)
    with seg.lock:
        return seg.module(x)


def apply_step(rref: rpc.RRef, context_id: int, lr: float) -> None:
    seg = _segment(rref)
    with seg.lock:
        step_with(seg.optimizer, dist_autograd.get_gradients(context_id), lr)


def relay(rref: rpc.RRef, x: torch.Tensor | None, grad: torch.Tensor | None, lr: float) -> torch.Tensor | None:
    """Relay engine, one call per batch: backprop ``grad`` through the previous activation and
    step, then run the forward of ``x`` and keep its graph for the gradient that comes next."""
    seg = _segment(rref)
    with seg.lock:
        if grad is not None:
            params = list(seg.module.parameters())
            grads = torch.autograd.grad(seg.pending, params, grad)
            seg.pending = None
            step_with(seg.optimizer, dict(zip(params, grads)), lr)
        if x is None:
            return None
        seg.pending = seg.module(x)
        return seg.pending.detach()


def infer(rref: rpc.RRef, x: torch.Tensor) -> torch.Tensor:
    seg = _segment(rref)
    with seg.lock, torch.no_grad():
        seg.module.eval()
        try:
            return seg.module(x)
        finally:
            seg.module.train()


def get_state(rref: rpc.RRef) -> dict[str, torch.Tensor]:
    seg = _segment(rref)
    with seg.lock:
        return {k: v.detach().clone() for k, v in seg.module.state_dict().items()}


def set_state(rref: rpc.RRef, state: dict[str, torch.Tensor]) -> None:
    seg = _segment(rref)
    with seg.lock:
        seg.module.load_state_dict(state)


def export_state(rref: rpc.RRef) -> dict:
    """Everything a checkpoint needs from this edge (the reply is pickled, so no aliasing)."""
    seg = _segment(rref)
    with seg.lock:
        return {"module": seg.module.state_dict(), "optimizer": seg.optimizer.state_dict(),
                "rng": torch.get_rng_state()}


def import_state(rref: rpc.RRef, state: dict) -> None:
    seg = _segment(rref)
    with seg.lock:
        seg.module.load_state_dict(state["module"])
        seg.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])


def describe() -> str:
    """Where this edge runs, for the central's banner and table."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def rss() -> int:
    """Resident memory of this edge process, in bytes."""
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
