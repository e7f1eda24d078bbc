"""The edge object: one replica of the plan's edge segments and this edge's data, and every call
the central (and, with edge-held weights, a peer edge) makes of it.

It is plain: its name, device, data, config and peers are given to it, and it reads no
environment and no RPC state, so it is built and tested the same way in one process (transport
loopback) or behind torch RPC (transport.rpc). Every call enters through ``serve``, the one
place that orders training calls and takes the lock, so a forward never overlaps a step.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from split_trainer.config import Config
from split_trainer.core import faults
from split_trainer.core.hops import Hop, crossing
from split_trainer.core.tensors import average_states, non_finite, poisoned
from split_trainer.data.placement import EdgeSide
from split_trainer.model.plan import Plan
from split_trainer.privacy.adversary import Adversary
from split_trainer.privacy.defences import Defences
from split_trainer.records import checkpoint
from split_trainer.records.metrics import resident_bytes
from split_trainer.privacy.scrutiny import GradientCheck
from split_trainer.training.dispatch import Turns
from split_trainer.training import policy
from split_trainer.training.engines import edge_engine
from split_trainer.training.stage import Stage
from split_trainer.transport.base import Peers
from split_trainer.transport.wire import Reply, WireFormat

UNLOCKED = ("gather_average", "rss", "finish")
"""Calls that take no lock: gather_average waits on peers that may be fetching this edge's own
replica; rss and finish touch no segment."""
FAULT_POINTS = {"get_state": "sync", "peer_state": "sync", "export_state": "export", "save_part": "export"}


def parts_folder(cfg: Config, name: str) -> Path:
    """Where edge ``name`` keeps its own checkpoint parts (privacy.edge_weights: edges):
    ``edges/<name>/`` in the checkpoint directory of ``cfg``, which must be the config of the
    process that hosts the edge (on RPC the edge's own command line), never one sent to it: the
    central would otherwise decide where an edge writes and deletes on the edge's own disk."""
    return checkpoint.directory(cfg) / "edges" / name


class Edge:
    """This edge's replica of the plan's edge segments and its data (data.placement). ``cfg`` is
    the central's config, checked against the edge's own (training.policy); where this edge's data
    lies and where its own checkpoint parts go (``parts``) and how many it keeps (``keep``) come from
    the hosting process's config alone. ``plan``:
    the plan its segments come from (training.hosting builds it for this edge's data)."""

    def __init__(self, name: str, cfg: Config, plan: Plan, device: torch.device, data: EdgeSide, parts: Path,
                 keep: int, peers: Peers, autograd: Any, guard: Callable[[], AbstractContextManager] = nullcontext):
        self.adversary = _adversary(cfg, plan, device)
        self.engine = edge_engine(cfg, plan, Stage(plan.on("edge"), cfg.train, device),
                                  Defences(cfg.privacy, plan.places, self.adversary), autograd)
        self.stage = self.engine.stage
        self.name, self.data, self.peers, self.guard = name, data, peers, guard
        # privacy.edge_weights: edges: this edge's checkpoint parts, on its own disk, as many as it keeps
        self.parts, self.keep = parts, keep
        checkpoint.remove_stale_temporaries(self.parts)
        self.average: Optional[dict[str, torch.Tensor]] = None
        self.wire = WireFormat(cfg.rpc.wire_types, graph=cfg.train.engine == "autograd")
        self.lock = threading.Lock()
        # With two batches in flight, two training calls can reach this edge at once: run them in
        # the order the central sent them.
        self.calls = Turns(0, cfg.rpc.timeout_s, "training call {} waited {:g} s for the one before it")
        self.labels: Optional[torch.Tensor] = None  # the labels of this edge's own batch in flight
        self.check = gradient_check(name, cfg)
        self.last_seen = time.monotonic()  # the last call from the central: a silent one ends the edge
        self.finished = threading.Event()

    def serve(self, method: str, args: tuple, seq: Optional[int] = None) -> Any:
        """The one entry of every call: training calls (numbered by ``seq``) in the order they
        were sent, then the lock (and the transport's guard), then the method."""
        call = self._call(method)
        self.last_seen = time.monotonic()
        point = FAULT_POINTS.get(method) or (method == "run" and ("eval" if _evaluating(args[0]) else "train"))
        action = point and faults.hit(point, self.name)
        if action == "leave":  # a fault on purpose: the edge goes away, as a lost connection (loopback's)
            raise ConnectionError(f"{self.name} left at its {point} call (SPLIT_TRAINER_FAULT)")
        if action == "nan":  # a fault on purpose: a poisoned edge
            for module in self.stage.modules.values():
                for parameter in module.parameters():
                    # .data: under the model's feet, as a bad value would land, not as an edit autograd
                    # would refuse for the previous batch's backward still to come
                    parameter.data.fill_(float("nan"))
        with policy.said(self.name):
            if method in UNLOCKED:
                return call(*args)
            if seq is not None:
                self.calls.wait(seq)
            try:
                with self.lock, self.guard():
                    return call(*args)
            finally:
                if seq is not None:
                    self.calls.done(seq)

    def _call(self, method: str) -> Callable[..., Any]:
        """The edge's own calls, and those its data placement answers (``EdgeSide.calls``)."""
        if method in CALLS:
            return partial(CALLS[method], self)
        if method in self.data.calls:
            return getattr(self.data, method)
        raise RuntimeError(f"{self.name}: no such call {method!r}")

    # -- training and evaluation --------------------------------------------------------------------
    def run(self, work: list[tuple[Hop, Any]], labels: Optional[torch.Tensor], lr: float) -> Reply:
        """Run the hops in ``work`` in order, each on its own input (a tensor, or a reference to
        one of this edge's own batches); reply with the last one's result. With the autograd engine this runs
        inside the caller's autograd context."""
        evaluating = _evaluating(work)
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
            if into.kind == "inputs":  # the inputs themselves, or a reference to this edge's own batch
                x, own, sent = self.data.inputs(payload)
                self.labels = own if own is not None else self.labels
                if self.check is not None and not hop.evaluating:
                    self.check.forward(own)
            else:
                x = self.wire.decode(payload, into)
                if self.check is not None and into.kind == "activation_grads" and hop.segment == 0:
                    self.check.backward(x)  # stops the edge, in one line, when the central is hijacking it
            reply = self.engine.run(hop, x, labels if labels is not None else self.labels, lr)
            if reply.output is not None:  # activations and gradients as the wire carries them
                reply = reply._replace(output=self.wire.encode(reply.output, crossing(hop, "out")))
            if isinstance(reply.loss, torch.Tensor):
                reply = reply._replace(loss=reply.loss.to("cpu"))
            if sent is not None:
                reply = reply._replace(labels=sent)
        return reply

    def apply_step(self, context_id: int, lr: float) -> None:
        """The autograd engine: step this edge's segments with the context's gradients."""
        self.engine.step_from_context(context_id, lr)

    # -- the replica and checkpoints ---------------------------------------------------------------
    def get_state(self) -> dict[str, torch.Tensor]:
        return self.stage.state_dict()

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.stage.load_state_dict(state)

    def export_state(self) -> dict[str, Any]:
        """Everything a checkpoint needs from this edge: its stage's part, where it stands in its
        own data, its engine's own state (a local loss's head) and, with privacy.adversary, its own
        decoder (only ever written to its own disk: the adversary needs edge-held weights)."""
        own = {"adversary": self.adversary.state()} if self.adversary else {}
        return {**self.stage.part(), "data": self.data.state(), **self.engine.own_state(), **own}

    def import_state(self, state: dict[str, Any]) -> None:
        self.data.load_state(state.get("data", {}))
        self.stage.load_part(state)
        if self.adversary and "adversary" in state:  # absent: a run that turned the adversary on as it resumed
            self.adversary.load(state["adversary"])
        self.engine.load_own(state)

    def save_part(self, step: int, job: str) -> dict[str, Any]:
        """Write this edge's checkpoint part for ``step`` to its own disk (atomically, as the central
        writes its own), unless it holds an inf or a NaN; return its size and SHA-256, which the
        central's manifest records."""
        if key := non_finite(self.stage.state_dict()):
            raise RuntimeError(f"{self.name}'s weights hold non-finite values ({key}) at step {step}: not checkpointed")
        path, _ = checkpoint.save(self.parts, step, {self.name: self.export_state()},
                                  {"job": job, "edge": self.name}, self.keep)
        return checkpoint.manifest_field(path, "files")[f"{self.name}.pt"]

    def load_part(self, step: int, expected: dict[str, Any]) -> None:
        """Continue from this edge's own part for ``step``, which must be the one the central's
        checkpoint names."""
        try:
            loaded = checkpoint.load(self.parts / f"step_{step:08d}")
        except ValueError as exc:
            raise RuntimeError(f"{self.name} cannot resume step {step} from its own disk: {exc}") from None
        if loaded.manifest["files"].get(f"{self.name}.pt", {}).get("sha256") != expected["sha256"]:
            raise RuntimeError(f"{self.name}'s checkpoint part for step {step} in {self.parts} is not the one the "
                               f"central's checkpoint names (another run's?): resume with --resume never")
        self.import_state(loaded.parts[self.name])

    # -- privacy.edge_weights: edges: the replicas never reach the central --------------------------
    def peer_state(self) -> dict[str, torch.Tensor]:
        """This edge's replica, for a peer's average: edge to edge."""
        return self.stage.state_dict()

    def gather_average(self, peers: list[str]) -> None:
        """Fetch the replicas of ``peers`` (in that order; this edge's own among them or not) and keep
        their average for ``apply_average``: every edge computes the same one."""
        waits = [None if peer == self.name else self.peers(peer) for peer in peers]  # all asked at once
        replicas = [self.serve("peer_state", ()) if w is None else w() for w in waits]
        bad = poisoned(dict(zip(peers, replicas)))
        if bad:
            raise RuntimeError(f"{self.name}: the replicas of {', '.join(bad)} hold non-finite values: not averaged")
        self.average = average_states(replicas)

    def apply_average(self) -> None:
        self.stage.load_state_dict(self.average)
        self.average = None

    # -- the rest -----------------------------------------------------------------------------------
    def about(self) -> dict[str, Any]:
        """Where this edge runs and what data it holds (``EdgeSide.held``: in edge placement its
        shard's sizes and label counts): for the central's banner, table and the run's files."""
        return {"host": f"{socket.gethostname()} pid {os.getpid()}", "threads": torch.get_num_threads(),
                "device": str(self.stage.device), "shard": self.data.held()}

    def rss(self) -> int:
        """Resident memory of this edge's process, in bytes."""
        return resident_bytes()

    def finish(self) -> None:
        self.finished.set()


def _adversary(cfg: Config, plan: Plan, device: torch.device) -> Optional[Adversary]:
    """This edge's own decoder (privacy.adversary), for the plan's first segment."""
    if cfg.privacy.adversary <= 0:
        return None
    return Adversary(cfg.privacy, plan.segments[0].module.to(device), plan.image, cfg.train.seed, device)


def _evaluating(work: list[tuple[Hop, Any]]) -> bool:
    return any(hop.evaluating for hop, _ in work)


CALLS: dict[str, Callable] = {name: getattr(Edge, name) for name in (
    "run", "apply_step", "get_state", "set_state", "export_state", "import_state", "save_part", "load_part",
    "peer_state", "gather_average", "apply_average", "about", "rss", "finish")}
"""What the central and the peers may call (and the calls of the edge's data placement,
``EdgeSide.calls``): nothing else on the object is reachable."""


def gradient_check(name: str, cfg: Config) -> Optional[GradientCheck]:
    """The edge's check of the central's gradients (privacy.hijack_check), where it can see them
    with the labels: its own data, a gradient at its first cut (the loss on the central, or a
    U-shaped plan's), carried by the relay engine's calls (distributed autograd applies them unseen).
    Not under activation noise: the central's gradient is then taken at a noised activation, and an
    honest run with much noise loses the labels' mark too (noise 1 x clip: a label gap of 0.094)."""
    places = [segment.get("place") for segment in cfg.model.plan] if cfg.model.plan else ["edge", "central"]
    if (cfg.privacy.hijack_check and cfg.data.placement == "edge" and cfg.train.edge_loss == "central"
            and cfg.train.engine == "relay" and places[0] == "edge" and cfg.privacy.noise == 0):
        return GradientCheck(name, cfg.privacy.hijack_check)
    return None
