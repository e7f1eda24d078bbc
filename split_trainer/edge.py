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
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch.distributed import rpc

from . import checkpoint, faults
from .config import Config
from .engines import Turns, engine_for
from .metrics import resident_bytes
from .placement import PLACEMENTS
from .privacy import Defences
from .plan import plan_for
from .route import Hop, crossing
from .stage import Stage, average_states
from .topology import Topology, device_for, edge_number, init_rpc
from .wire import Reply, WireFormat

_finished = threading.Event()
_last_seen = [time.monotonic()]  # the last time the central called us
_loaded: list = [None]  # what this host's placement loaded before RPC (edge placement: its data set)
_hosts: list = [None]  # this process's EdgeHost, for its peers (privacy.edge_weights: edges)


class EdgeHost:
    """This edge's replica of the plan's edge segments and its data (placement.py). ``cfg`` is the
    central's config: it decides everything but where this host's data lies."""

    def __init__(self, cfg: Config):
        device = device_for(cfg.train.edge_device, "train.edge_device", int(os.environ.get("LOCAL_RANK", "0")))
        plan = plan_for(cfg, cfg.train.seed)  # the weights the central's seed draws: one model, N copies
        self.engine = engine_for(cfg.train.engine, plan.places, Stage(plan.on("edge"), cfg.train, device),
                                 cfg.train.in_flight, Defences(cfg.privacy, plan.places))
        self.stage = self.engine.stage
        self.name, self.timeout_s = rpc.get_worker_info().name, cfg.rpc.timeout_s
        # privacy.edge_weights: edges: this edge's checkpoint parts, on its own disk; one more kept
        # than the central keeps, so that a part outlives a central checkpoint that failed to land.
        self.parts, self.keep = checkpoint.directory(cfg) / "edges" / self.name, cfg.checkpoint.keep + 1
        self.average: Optional[dict[str, torch.Tensor]] = None
        checkpoint.remove_stale_temporaries(self.parts)
        _hosts[0] = self
        self.wire = WireFormat(cfg.rpc.wire_types, graph=cfg.train.engine == "autograd")
        self.lock = threading.Lock()
        # With two batches in flight, two training calls can reach this host at once: run them in
        # the order the central sent them.
        self.calls = Turns(0, cfg.rpc.timeout_s, "training call {} waited {:g} s for the one before it")
        self.data = PLACEMENTS[cfg.data.placement].edge_data(cfg, _loaded[0], edge_number(self.name))
        self.labels: Optional[torch.Tensor] = None  # the labels of this edge's own batch in flight

    @contextmanager
    def in_order(self, seq: Optional[int]) -> Iterator[None]:
        """Training calls (numbered) one after the other in the order they were sent."""
        if seq is None:
            yield
            return
        self.calls.wait(seq)
        try:
            yield
        finally:
            self.calls.done(seq)

    def run(self, work: list[tuple[Hop, Any]], labels: Optional[torch.Tensor], lr: float, evaluating: bool) -> Reply:
        self.stage.train(not evaluating)
        try:
            return self._run(work, labels, lr)
        finally:
            self.stage.train(True)

    def _run(self, work: list[tuple[Hop, Any]], labels: Optional[torch.Tensor], lr: float) -> Reply:
        reply = Reply()
        for hop, payload in work:
            into = crossing(hop, "in")
            sent = None
            if into.kind == "inputs":  # the inputs themselves, or a draw of this edge's own batch
                x, own, sent = self.data.take(payload)
                self.labels = own if own is not None else self.labels
            else:
                x = self.wire.decode(payload, into)
            reply = self.engine.run(hop, x, labels if labels is not None else self.labels, lr)
            if reply.output is not None:  # activations and gradients as the wire carries them
                reply = reply._replace(output=self.wire.encode(reply.output, crossing(hop, "out")))
            if isinstance(reply.loss, torch.Tensor):
                reply = reply._replace(loss=reply.loss.to("cpu"))
            if sent is not None:
                reply = reply._replace(labels=sent)
        return reply


def _host(rref: rpc.RRef) -> EdgeHost:
    _last_seen[0] = time.monotonic()
    return rref.local_value()


def run(rref: rpc.RRef, work: list[tuple[Hop, Any]], labels: Optional[torch.Tensor], lr: float,
        seq: Optional[int] = None) -> Reply:
    """Run the hops in ``work`` in order, each on its own input (a tensor, or a draw of this edge's
    own batch); reply with the last one's result. ``seq`` numbers training calls: they run in that
    order. With the autograd engine this runs inside the caller's distributed-autograd context."""
    host = _host(rref)
    evaluating = any(hop.evaluating for hop, _ in work)
    faults.hit("eval" if evaluating else "train")
    with host.in_order(seq), host.lock:
        return host.run(work, labels, lr, evaluating)


def apply_step(rref: rpc.RRef, context_id: int, lr: float) -> None:
    host = _host(rref)
    with host.lock:
        host.stage.step_from_context(context_id, lr)


def get_state(rref: rpc.RRef) -> dict[str, torch.Tensor]:
    host = _host(rref)
    faults.hit("sync")
    with host.lock:
        return host.stage.state_dict()


def set_state(rref: rpc.RRef, state: dict[str, torch.Tensor]) -> None:
    host = _host(rref)
    with host.lock:
        host.stage.load_state_dict(state)


def export_state(rref: rpc.RRef) -> dict:
    """Everything a checkpoint needs from this edge (the reply is pickled, so no aliasing): its
    stage's part, and where it stands in its own data."""
    host = _host(rref)
    faults.hit("export")
    with host.lock:
        return {**host.stage.part(), "data": host.data.state()}


def import_state(rref: rpc.RRef, state: dict) -> None:
    host = _host(rref)
    with host.lock:
        host.data.load_state(state.get("data", {}))
        host.stage.load_part(state)


# -- privacy.edge_weights: edges: the replicas never reach the central -------------------------
def peer_state() -> dict[str, torch.Tensor]:
    """This edge's replica, for a peer's average: edge to edge."""
    host = _hosts[0]
    faults.hit("sync")
    with host.lock:
        return host.stage.state_dict()


def gather_average(rref: rpc.RRef, peers: list[str]) -> None:
    """Fetch the replicas of ``peers`` (in that order; this edge's own among them or not) and keep
    their average for ``apply_average``: every edge computes the same one."""
    host = _host(rref)
    futures = [None if p == host.name else rpc.rpc_async(p, peer_state, timeout=host.timeout_s) for p in peers]
    host.average = average_states([peer_state() if f is None else f.wait() for f in futures])


def apply_average(rref: rpc.RRef) -> None:
    host = _host(rref)
    with host.lock:
        host.stage.load_state_dict(host.average)
        host.average = None


def save_part(rref: rpc.RRef, step: int, job: str) -> dict[str, Any]:
    """Write this edge's checkpoint part for ``step`` to its own disk (atomically, as the central
    writes its own); return its size and SHA-256, which the central's manifest records."""
    host = _host(rref)
    faults.hit("export")
    with host.lock:
        part = {**host.stage.part(), "data": host.data.state()}
    path, _ = checkpoint.save(host.parts, step, {host.name: part}, {"job": job, "edge": host.name}, host.keep)
    return checkpoint.manifest_field(path, "files")[f"{host.name}.pt"]


def load_part(rref: rpc.RRef, step: int, expected: dict[str, Any]) -> None:
    """Continue from this edge's own part for ``step``, which must be the one the central's
    checkpoint names."""
    host = _host(rref)
    try:
        loaded = checkpoint.load(host.parts / f"step_{step:08d}")
    except ValueError as exc:
        raise RuntimeError(f"{host.name} cannot resume step {step} from its own disk: {exc}") from None
    if loaded.manifest["files"][f"{host.name}.pt"]["sha256"] != expected["sha256"]:
        raise RuntimeError(f"{host.name}'s checkpoint part for step {step} in {host.parts} is not the one the "
                           f"central's checkpoint names (another run's?): resume with --resume never")
    import_state(rref, loaded.parts[host.name])


def describe(rref: rpc.RRef) -> dict:
    """Where this edge runs and, in edge placement, its shard's sizes and label counts (once its
    segments are built): for the central's banner, table and partition.json."""
    host = _host(rref)
    return {"host": f"{socket.gethostname()} pid {os.getpid()}", "threads": torch.get_num_threads(),
            "device": str(host.stage.device), "shard": host.data.describe()}


def rss(rref: rpc.RRef) -> int:
    """Resident memory of this edge process, in bytes."""
    _host(rref)
    return resident_bytes()


def finish() -> None:
    _finished.set()


def serve(topo: Topology, cfg: Config) -> None:
    """Serve RPCs until the central says the job is done; give up if it falls silent."""
    torch.manual_seed(cfg.train.seed + edge_number(topo.name))
    # An edge prints only warnings and errors, each on one line under its own name.
    warnings.showwarning = lambda message, category, *_args, **_kw: print(
        f"split_trainer: [{topo.name}] warning: {category.__name__}: {message}", file=sys.stderr, flush=True)
    _loaded[0] = PLACEMENTS[cfg.data.placement].load_on_edge(cfg)  # a missing data folder fails here, before RPC
    init_rpc(topo, cfg)
    _last_seen[0] = time.monotonic()
    poll = min(5.0, cfg.rpc.timeout_s)
    while not _finished.wait(poll):
        silent = time.monotonic() - _last_seen[0]
        if silent > cfg.rpc.timeout_s:
            raise TimeoutError(f"no call from the central for {silent:.0f} s (rpc.timeout_s={cfg.rpc.timeout_s:g})")
    rpc.shutdown(graceful=True)
