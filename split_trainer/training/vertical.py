"""The driver of a vertical fleet (data.placement: vertical): every batch goes to every party at
once, the central merges their activations (model.merge), runs its segment with the loss, and
sends each party the gradient of its own part.

It is made of the engines' per-batch pieces (training.engines: ``first``, ``turn``, ``last``,
``backward``). With the relay engine one call per party per batch carries the batch's gradient back
and the next batch's reference forward (as a horizontal relay with one batch in flight). With the
autograd engine each batch is one distributed-autograd context across every party; its backward
reaches each party's segment, and each party steps from the context. Parties are called in fleet
order and their parts merged in that order, so a run is a function of its seed and config, as a
horizontal one is.

Everything else a vertical fleet does differently is here too, behind the driver's interface
(training.driver.Driver): its data (data.vertical: the parties' records, aligned by
private set intersection before training), its model (model.vertical: a first segment per
party), no replica syncs, no model.pt, what its checkpoints' fingerprint adds, and what the audit
attacks (each party's segment on its own region of the images).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch

from split_trainer.config import Config, ConfigError
from split_trainer.core.batch import Batch
from split_trainer.core.errors import JobError
from split_trainer.data.datasets import spec_of
from split_trainer.data.vertical import PartyData, VerticalData, party_inputs, regions
from split_trainer.model.plan import Plan
from split_trainer.model.vertical import merge, unmerge, vertical_plan, width_of
from split_trainer.privacy.audit import AuditTarget
from split_trainer.training.driver import Driver
from split_trainer.training.engines import Autograd, Engine, Finished
from split_trainer.training.fleet import Fleet
from split_trainer.transport.link import Link
from split_trainer.transport.wire import Reply

Tensor = torch.Tensor


class Vertical(Driver):
    """Training and evaluation of one vertical fleet, on the central."""
    data = VerticalData
    replicas = False  # each party holds its own segment
    no_model_file = ("model.pt not written: a vertical model is one first segment per party and the central's; the "
                     "checkpoint holds them (docs/vertical.md)")
    refuses_merge = ("is a vertical run's: one first segment per party, not replicas of one model to merge; its own "
                     "evaluation is in metrics.jsonl, and the audit attacks each party (docs/vertical.md)")

    def served_by(self, batch: Batch) -> str:
        return f"the parties {', '.join(self.fleet.names)}"  # every party computes a part of every batch

    @staticmethod
    def plan(cfg: Config, seed: int, party: Optional[tuple[int, tuple[int, ...]]] = None) -> Plan:
        """Party ``party`` (number, feature shape)'s first segment and the central's; the central's
        plan (``party`` None) carries party 1's as a stand-in."""
        return vertical_plan(cfg, seed, party)

    @classmethod
    def edge_plan(cls, cfg: Config, data: PartyData) -> Plan:
        return cls.plan(cfg, cfg.train.seed, data.party)

    @staticmethod
    def fingerprint(cfg: Config) -> dict[str, Any]:
        # one segment per party, on its region, merged so
        return {"edges": cfg.topology.edges, "vertical": {"regions": cfg.data.regions, "merge": cfg.model.merge}}

    @staticmethod
    def layout(cfg: Config, plan: Plan) -> str:
        (_, edge), (_, central) = plan.layout
        return (f"each of {cfg.topology.edges} parties {edge[0]}..{edge[-1]} on its own features | central merge "
                f"({cfg.model.merge}) {central[0]}..{central[-1]}")

    @classmethod
    def audit_targets(cls, cfg: Config, parts: dict[str, Any]) -> list[AuditTarget]:
        """Each party's first segment, attacked on its own region of the images, as the central
        receives it from that party (docs/vertical.md)."""
        if cfg.data.name == "csv":
            raise ConfigError("the audit attacks images; a csv run's parties hold tables (docs/vertical.md)")
        spec, targets = spec_of(cfg.data), []
        for k, (rows, cols) in enumerate(regions(cfg), 1):
            plan = cls.plan(cfg, cfg.train.seed, (k, party_inputs(cfg, k)))
            plan.segments[0].module.load_state_dict(parts[f"edge{k}"]["module"])
            plan.full.train()

            def crop(t: Tensor, rows: slice = rows, cols: slice = cols) -> Tensor:
                return t[:, :, rows, cols].contiguous()

            def placed(images: Tensor, rows: slice = rows, cols: slice = cols) -> Tensor:
                canvas = torch.zeros(len(images), spec.channels, spec.size, spec.size)
                canvas[:, :, rows, cols] = images
                return canvas

            targets.append(AuditTarget(plan, [(0, f"edge{k} after {plan.cuts[0]}")], crop, placed))
        return targets

    def __init__(self, cfg: Config, engine: Engine, fleet: Fleet, placement: VerticalData):
        super().__init__(cfg, engine, fleet, placement)
        self.how = cfg.model.merge
        self.width = width_of(engine.stage.modules[1])  # what the central's segment was made for

    def prepare(self) -> None:
        """The records every party holds, by private set intersection (data.vertical)."""
        self.placement.align(self.fleet)

    def train_span(self, span: list[Batch], lr: float, finished: Finished) -> set[str]:
        """Train ``span``'s batches, on one thread of the fleet's pool (the main thread stays free
        for SIGTERM); return the parties that trained (all of them)."""
        train = self._autograd if isinstance(self.engine, Autograd) else self._relay
        self.fleet.pool.submit(train, span, lr, finished).result()
        return set(self.fleet.names)

    def _merged(self, parts: list[Tensor]) -> Tensor:
        x = merge(parts, self.how)
        if x.shape[1] != self.width:
            widths = ", ".join(f"{name} {part[0].numel()}" for name, part in zip(self.fleet.names, parts))
            raise RuntimeError(f"the parties' activations ({widths} values per sample) merge to {x.shape[1]}, but "
                               f"the central's segment takes {self.width}: a first segment whose output width "
                               f"depends on its party's feature count cannot be sized by the central (docs/vertical.md)")
        return x

    def welcome(self, link: Link) -> None:
        self.placement.realign(link)

    def _relay(self, span: list[Batch], lr: float, finished: Finished) -> None:
        """The span from its first batch; in a live fleet a party that leaves pauses the step until
        it is back (Fleet.pause), and the span goes on from the batch it stopped at, with the parts
        of that batch the others had sent (none is computed, or released, twice)."""
        done: list[Batch] = []  # the span's batches trained, each assigned once
        arrived: dict[str, Tensor] = {}  # the next batch's parts, by party, once they reach the central
        while len(done) < len(span):
            try:
                self._relay_from(span, done, arrived, lr, finished)
            except JobError as exc:
                self.fleet.pause(exc, span[0].step + len(done))

    def _relay_from(self, span: list[Batch], done: list[Batch], arrived: dict[str, Tensor], lr: float,
                    finished: Finished) -> None:
        engine, links, start = self.engine, self.fleet.links, len(done)
        waits = [partial(arrived.pop, link.name) if link.name in arrived else
                 _output(link.submit(engine.first(span[start]), None, lr)) for link in links]
        for i in range(start, len(span)):
            parts = _gathered(links, waits, arrived)
            batch = self.placement.assign(span[i])
            grad, loss = engine.turn(None, batch, self._merged(parts), lr)
            grads = unmerge(grad, [tuple(p.shape[1:]) for p in parts], self.how)
            ahead = engine.first(span[i + 1]) if i + 1 < len(span) else []
            waits = [_output(link.submit([*engine.last(g), *ahead], None, lr)) for link, g in zip(links, grads)]
            self._finished(batch, loss, finished)
            done.append(batch)
        _gathered(links, waits, {})

    def _autograd(self, span: list[Batch], lr: float, finished: Finished) -> None:
        engine, links = self.engine, self.fleet.links
        for batch in span:
            batch = self.placement.assign(batch)
            with engine.autograd.context() as ctx:
                waits = [link.submit(engine.first(batch), None, lr) for link in links]
                parts = [wait().output for wait in waits]
                _, loss = engine.turn(None, batch, self._merged(parts), lr)
                engine.backward(ctx, loss, lr)  # across every party's cut
                for wait in [link.step(ctx, lr) for link in links]:
                    wait()
            self._finished(batch, loss.item(), finished)

    def _finished(self, batch: Batch, loss: float, finished: Finished) -> None:
        for link in self.fleet.links:
            link.trained()
        finished(batch, loss)

    def evaluate(self, epoch: int) -> tuple[float, float, dict[str, Any]]:
        """(test loss, test accuracy, {}) on the shared test records, one batch at a time, every
        party's part of it at once (a party that leaves a live fleet: Left, and the central does
        it again once the party is back)."""
        try:
            return self._evaluate()
        except JobError as exc:
            raise self.fleet.lost(exc) from exc

    def _evaluate(self) -> tuple[float, float, dict[str, Any]]:
        infer, score = self.engine.eval_hops
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


def _output(wait: Callable[[], Reply]) -> Callable[[], Optional[Tensor]]:
    return lambda: wait().output


def _gathered(links: list[Link], waits: list[Callable[[], Optional[Tensor]]],
              arrived: dict[str, Tensor]) -> list[Tensor]:
    """Every party's part of a batch, in fleet order; when a call fails, the parts that did arrive
    are kept in ``arrived`` (by party) and the first failure is raised once every call has ended."""
    failure = None
    for link, wait in zip(links, waits):
        try:
            arrived[link.name] = wait()
        except JobError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return [arrived.pop(link.name) for link in links]
