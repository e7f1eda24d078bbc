"""The interface every placement's driver implements (one per ``data.placement``, named in
training.drivers): what differs between placements, said once. Class attributes and class
methods hold before a fleet exists (the data, the plans, the fingerprint, the banner's plan, what
the audit attacks); an instance drives one run's fleet on the central (``prepare``, ``train_span``,
``evaluate``)."""

from __future__ import annotations

from typing import Any, Optional

from split_trainer.config import Config
from split_trainer.core.batch import Batch
from split_trainer.data.placement import Placement
from split_trainer.model.plan import Plan, layout_text
from split_trainer.privacy.audit import AuditTarget
from split_trainer.training.engines import Engine, Finished
from split_trainer.training.fleet import Fleet
from split_trainer.transport.link import Link


class Driver:
    data: type
    """The placement's data: the central's side (``data(cfg, labels_here)``, a data.placement.Placement)
    and, as its static methods ``load_on_edge`` and ``edge_data``, each edge's."""
    replicas = True
    """Whether the edges hold replicas of one segment, averaged at every sync."""
    no_model_file: Optional[str] = None
    """Why no model.pt is ever written, if none is (otherwise one is, where the weights are at hand)."""
    refuses_merge: Optional[str] = None
    """Why ``evaluate`` and ``export`` cannot merge a checkpoint of this placement into one model."""

    @staticmethod
    def plan(cfg: Config, seed: int) -> Plan:
        """The central's plan."""
        raise NotImplementedError

    @classmethod
    def edge_plan(cls, cfg: Config, data: Any) -> Plan:
        """The plan an edge holding ``data`` (its data.placement.EdgeSide) builds its segments from."""
        raise NotImplementedError

    @staticmethod
    def fingerprint(cfg: Config) -> dict[str, Any]:
        """What a checkpoint of this placement must agree with beyond the model and plan."""
        return {}

    @staticmethod
    def layout(cfg: Config, plan: Plan) -> str:
        """The banner's plan."""
        return layout_text(plan.layout)

    @classmethod
    def audit_targets(cls, cfg: Config, parts: dict[str, Any]) -> list[AuditTarget]:
        """What the audit attacks, with a checkpoint's ``parts`` (records.parts.load_parts)."""
        raise NotImplementedError

    def __init__(self, cfg: Config, engine: Engine, fleet: Fleet, placement: Placement):
        self.cfg, self.engine, self.fleet, self.placement = cfg, engine, fleet, placement

    def prepare(self) -> None:
        """The fleet is up, before the placement binds to it: anything the edges must agree on first."""

    def welcome(self, link: Link) -> None:
        """An edge joins a live fleet (training.live), before it takes its weights: what its
        placement must first agree with it (a vertical party: the shared records)."""

    def served_by(self, batch: Batch) -> str:
        """Who computed ``batch``'s way to the central, for messages: its edge."""
        return self.fleet.names[batch.edge]

    def train_span(self, span: list[Batch], lr: float, finished: Finished) -> set[str]:
        """Train ``span``'s batches (``finished(batch, loss)`` after each); return the names of the
        edges that trained them."""
        raise NotImplementedError

    def evaluate(self, epoch: int) -> tuple[float, float, dict[str, Any]]:
        """(test loss, test accuracy, the placement's extra record) of the model as it stands."""
        raise NotImplementedError
