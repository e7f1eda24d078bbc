"""A malicious central against real edges, for the audit's hijacking attack (privacy.hijacking).

The edge is built by its own code (training.hosting, on the loopback transport) from the
checkpoint's config, put back as the checkpoint left it, and trained on its own shard through its
real calls, defences included: only the central is replaced, by one that answers each activation
with the hijacker's gradient instead of the task's. Where no gradient reaches an edge
(``train.edge_loss: local``) the attacker has no lever: the edge trains on its own loss, and the
attack is measured all the same.

To score the attack the harness computes, from the hijacked edge's weights, what the central would
receive for the audit's private images (the attacker never sees those weights; it receives the
same features for the edge's own batches).
"""

from __future__ import annotations

import dataclasses
import tempfile
from typing import Any, Callable, Optional

import torch

from split_trainer.config import Config
from split_trainer.core.errors import JobError
from split_trainer.data.placement import EdgeData
from split_trainer.privacy.audit import AuditTarget, Views
from split_trainer.privacy.hijacking import Hijacker
from split_trainer.training.engines import central_engine
from split_trainer.training.hosting import loopback_transport
from split_trainer.training.stage import Stage
from split_trainer.transport.link import Link
from split_trainer.transport.wire import WireFormat

Tensor = torch.Tensor
EDGE = "edge1"


def hijack(cfg: Config, parts: dict[str, Any], target: AuditTarget, data: dict[str, Any], steps: int, seed: int,
           score: Callable[[Tensor], dict[str, Any]], progress: Optional[Callable[[int], None]] = None
           ) -> tuple[Tensor, dict[str, Any]]:
    """``steps`` of the attack on edge1 of the checkpoint (``parts``): the audit's private pool as
    the attacker decodes it at the end, and what happened: whether its gradients reached the edge
    (``lever``, their bytes), and, where the edge's own check (privacy.hijack_check) stopped it,
    at which step and what the attacker's decoder scored then (``score``). The attack then goes on
    with the check set aside, to measure what an edge without it would have given away."""
    scratch = tempfile.TemporaryDirectory()  # the edge's parts folder: not the audited run's, which may be training
    cfg = dataclasses.replace(cfg, topology=dataclasses.replace(cfg.topology, transport="loopback", membership="fixed"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, dir=scratch.name))
    transport = loopback_transport(cfg)
    try:
        remote, = transport.connect([EDGE], cfg)
        edge = remote.edge
        edge.import_state(parts[EDGE])  # the edge as the checkpoint left it (its own resume would)
        link = Link(EDGE, remote, WireFormat(cfg.rpc.wire_types), cfg.rpc.timeout_s)
        plan = target.plan
        engine = central_engine(cfg, plan.places, Stage(plan.on("central"), cfg.train), transport.autograd,
                                transport.guard)
        placement = EdgeData(cfg, labels_here=True)
        placement.bind([link.call("about")], [EDGE], {}, {})
        hijacker = Hijacker(plan.segments[0].module, data["public"], data["public_pixels"], seed,
                            cfg.data.batch_size)

        def decoded() -> Tensor:
            plan.full.load_state_dict(edge.stage.state_dict(), strict=False)  # the segment as it stands
            with torch.no_grad():
                received = torch.cat([Views(plan, cfg.privacy, 0).received(b) for b in data["pool"].split(256)])
            return hijacker.decode(received)

        info = {"steps": steps, "check": "on" if edge.check is not None else "off (not where the edge can see it)"}
        info |= _attack(link, edge, engine, placement, hijacker, steps, cfg.train.lr, progress,
                        lambda: score(decoded()))
        return decoded(), info
    finally:
        transport.shutdown(graceful=False)
        scratch.cleanup()


def _attack(link: Link, edge: Any, engine: Any, placement: EdgeData, hijacker: Hijacker, steps: int, lr: float,
            progress: Optional[Callable[[int], None]], scored: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The attack's loop over the edge's own batches: the bytes of forged gradients that reached it,
    and when (and at what score) the edge's check stopped it."""
    step, epoch, found = 0, 0, {}
    while step < steps:
        for batch in placement.batches(epoch, 0):
            batch = placement.assign(batch)
            received = link.run(engine.first(batch), None, lr).output
            work = engine.last(hijacker.gradient(received))
            if work:  # none under a local loss: the edge takes no gradient from the central
                try:
                    link.run(work, None, lr)
                except JobError:
                    if edge.check is None or edge.check.verdict is None:
                        raise
                    found = {"detected_at_step": step + 1, "verdict": edge.check.verdict, "at_detection": scored()}
                    edge.check = None  # set aside: the rest measures an edge without it
                    link.run(work, None, lr)  # the gradient it refused, taken now (its forward awaits it)
            step += 1
            if progress is not None:
                progress(step)
            if step == steps:
                break
        epoch += 1
    sent = link.snapshot().sent.get("activation_grads", 0)
    return {"lever": sent > 0, "gradient_bytes_sent": sent, **found}
