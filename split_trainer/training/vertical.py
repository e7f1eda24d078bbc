"""The central's driver of a vertical fleet (data.placement: vertical): every batch goes to every
party at once, the central merges their activations (model.merge), runs its segment with the loss,
and sends each party the gradient of its own part.

With the relay engine one call per party per batch carries the batch's gradient back and the next
batch's reference forward (as a horizontal relay with one batch in flight). With the autograd engine
each batch is one distributed-autograd context across every party; its backward reaches each
party's segment, and each party steps from the context. Parties are called in fleet order and their
parts merged in that order, so a run is a function of its seed and config, as a horizontal one is.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from split_trainer.data.vertical import VerticalData
from split_trainer.model.vertical import merge, unmerge, width_of
from split_trainer.training.engines import Engine
from split_trainer.training.fleet import Fleet
from split_trainer.training.route import Batch, Hop

Tensor = torch.Tensor
Finished = Callable[[Batch, float], None]


class Vertical:
    """Training and evaluation of one vertical fleet, on the central."""

    def __init__(self, engine: Engine, fleet: Fleet, placement: VerticalData, how: str, width: int):
        self.engine, self.fleet, self.placement, self.how = engine, fleet, placement, how
        self.width = width  # what the central's segment was made for (model.vertical.merged_width)

    def train_span(self, span: list[Batch], lr: float, finished: Finished) -> set[str]:
        """Train ``span``'s batches, on one thread of the fleet's pool (the main thread stays free
        for SIGTERM); return the parties that trained (all of them)."""
        train = self._relay if self.engine.name == "relay" else self._autograd
        self.fleet.pool.submit(train, span, lr, finished).result()
        return set(self.fleet.names)

    def _merged(self, batch: Batch, parts: list[Tensor]) -> Tensor:
        x = merge(parts, self.how)
        if x.shape[1] != self.width:
            widths = ", ".join(f"{name} {part[0].numel()}" for name, part in zip(self.fleet.names, parts))
            raise RuntimeError(f"the parties' activations ({widths} values per sample) merge to {x.shape[1]}, but "
                               f"the central's segment takes {self.width}: a first segment whose output width "
                               f"depends on its party's feature count cannot be sized by the central (docs/vertical.md)")
        return x

    def _relay(self, span: list[Batch], lr: float, finished: Finished) -> None:
        route, links = self.engine.route, self.fleet.links
        (turn,) = route.turn
        waits = [link.submit([(route.first, span[0].source)], None, lr) for link in links]
        for i, batch in enumerate(span):
            batch = self.placement.assign(batch)
            parts = [wait().output for wait in waits]
            with self.engine.guard():
                reply = self.engine.run(turn, self._merged(batch, parts), batch.y, lr)
            grads = unmerge(reply.output, [tuple(p.shape[1:]) for p in parts], self.how)
            later = span[i + 1] if i + 1 < len(span) else None
            ahead = [(route.first, later.source)] if later is not None else []
            waits = [link.submit([(route.last, grad), *ahead], None, lr) for link, grad in zip(links, grads)]
            self._finished(batch, reply.loss, finished)
        for wait in waits:
            wait()

    def _autograd(self, span: list[Batch], lr: float, finished: Finished) -> None:
        route, links, autograd = self.engine.route, self.fleet.links, self.engine.autograd
        (turn,) = route.turn
        for batch in span:
            batch = self.placement.assign(batch)
            with autograd.context() as ctx:
                waits = [link.submit([(route.first, batch.source)], None, lr) for link in links]
                parts = [wait().output for wait in waits]
                with self.engine.guard():
                    loss = self.engine.run(turn, self._merged(batch, parts), batch.y, lr).loss
                    autograd.backward(ctx, [loss])  # across every party's cut
                    self.engine.step_from_context(ctx, lr)
                for wait in [link.send("apply_step", (ctx, lr)) for link in links]:
                    wait()
            self._finished(batch, loss.item(), finished)

    def _finished(self, batch: Batch, loss: float, finished: Finished) -> None:
        for link in self.fleet.links:
            link.trained()
        finished(batch, loss)

    def evaluate(self) -> tuple[float, float, dict[str, Any]]:
        """(test loss, test accuracy, {}) on the shared test records, one batch at a time, every
        party's part of it at once."""
        infer, score = (Hop("infer", 0, "edge"), Hop("score", 1, "central"))
        total: list[float] = [0.0, 0.0, 0.0]
        self.engine.stage.train(False)
        try:
            for source, y in self.placement.test_batches():
                waits = [link.submit([(infer, source)], None, 0.0, evaluating=True) for link in self.fleet.links]
                parts = [wait().output for wait in waits]
                result = self.engine.run(score, merge(parts, self.how), y, 0.0).score
                total = [t + s for t, s in zip(total, result)]
        finally:
            self.engine.stage.train(True)
        return total[0] / total[2], total[1] / total[2], {}


def vertical_driver(engine: Engine, fleet: Fleet, placement: Any, how: str) -> Optional[Vertical]:
    """The driver of a vertical fleet; None for a horizontal one."""
    if not isinstance(placement, VerticalData):
        return None
    return Vertical(engine, fleet, placement, how, width_of(engine.stage.modules[1]))
