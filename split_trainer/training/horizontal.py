"""The driver of a horizontal fleet (data.placement: central or edge): every edge hosts a replica
of one model's edge segments, each batch is one edge's, and the replicas are averaged at every
sync.

One central thread per edge (its *driver thread*, fleet.Fleet.per_edge) keeps that edge's batches
in flight, so the edges compute at once; what a batch does on its way through the plan is the
engine's business (engines.py); which edge takes which batch, and the order of the central's
turns, is dispatch.py's (round robin, by default: a run is a function of its seed and config).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable

from split_trainer.config import Config
from split_trainer.core.batch import Batch
from split_trainer.data.placement import CentralData, EdgeData
from split_trainer.model.plan import Plan, plan_for
from split_trainer.privacy.audit import AuditTarget, edge_cuts
from split_trainer.records.parts import merged_state
from split_trainer.training import dispatch, evaluation
from split_trainer.training.driver import Driver
from split_trainer.training.engines import Finished


class Horizontal(Driver):
    """data.placement: central: the central holds the data set and sends each batch's inputs."""
    data = CentralData

    @staticmethod
    def plan(cfg: Config, seed: int) -> Plan:
        return plan_for(cfg, seed)

    @classmethod
    def edge_plan(cls, cfg: Config, data: Any) -> Plan:
        """The weights the central's seed draws: one model, N copies."""
        return cls.plan(cfg, cfg.train.seed)

    @classmethod
    def audit_targets(cls, cfg: Config, parts: dict[str, Any]) -> list[AuditTarget]:
        """Every edge cut of the merged model."""
        plan = cls.plan(cfg, cfg.train.seed)
        plan.full.load_state_dict(merged_state(parts))
        plan.full.train()  # as the segments run while training: what the central received then
        return [AuditTarget(plan, edge_cuts(plan))]

    def train_span(self, span: list[Batch], lr: float, finished: Finished) -> set[str]:
        # A batch waits at most for the batch before it: its first call, then its turn, one call
        # per edge hop in the turn. One bound more lets a hung edge's own timeout be the report.
        bound = (2 + self.engine.route.edge_hops_in_turn) * self.cfg.rpc.timeout_s
        queue, trained = dispatch.queue(self.cfg.train.dispatch, span), set()

        def drive(turns: dispatch.Turns, k: int, batches: Iterable[Batch]) -> None:
            link = self.fleet.links[k]

            def done(batch: Batch, loss: float) -> None:
                finished(batch, loss)
                link.trained()
                trained.add(link.name)
                queue.finished(batch)

            self.engine.drive(link, batches, turns, lr, done)

        while len(queue):  # a live fleet's edge that leaves gives its batches back: the others, or a newcomer, take them
            takers = self.fleet.takers(self.placement.takers(span))
            if not takers:
                self.fleet.await_edge()
                continue
            turns = queue.turns(bound)
            self.fleet.per_edge(partial(drive, turns), queue.shares(len(self.fleet), self.placement.assign, takers),
                                turns.fail, queue.give_back)
        return trained

    def evaluate(self, epoch: int) -> tuple[float, float, dict[str, Any]]:
        return evaluation.evaluate(self.engine, self.fleet, self.placement, epoch)


class EdgeHeld(Horizontal):
    """data.placement: edge: each edge's own shard, carved over topology.edges."""
    data = EdgeData

    @staticmethod
    def fingerprint(cfg: Config) -> dict[str, Any]:
        return {"edges": cfg.topology.edges}  # the shards are carved over topology.edges
