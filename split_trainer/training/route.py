"""The route of one batch through a plan: its hops (one segment on one side each) and their order.

Places alternate, so every hop hands its output across the wire to the next. With the ``relay``
engine, for segments 0..m-1:

    forward 0 (edge) | forward 1 .. forward m-2 | turnaround m-1 | backward m-2 .. backward 1 | backward 0 (edge)
                     '------------------------- the central's turn ---------------------------'

With ``train.edge_loss: local`` (single cut) the route is ``local 0 (edge) | turnaround 1``: the
edge's hop is its forward, its own head's loss and its step; the central's turnaround sends
nothing back.

``turnaround`` is the last segment's forward, the loss and its backward. The central's segments
are in use from its first hop to its last: that stretch is the central's *turn*, which batches
take strictly in dispatch order. The edge's first forward runs before the turn (while other
edges' batches hold it), and its last backward after. With the ``autograd`` engine the turn is
the forwards and the ``loss``; distributed autograd carries the gradients back by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch


@dataclass(frozen=True)
class Batch:
    """One training batch on its route. Each stage that learns something of it makes a new record
    (``dataclasses.replace``): the placement makes it (step, edge, and the inputs when the central
    holds them), dispatch names the edge under free_first, the placement's ``assign`` gives an
    edge-held batch its place in that edge's shard, and the engine adds what the first
    activation's reply tells."""
    step: int
    edge: int
    """The index of the edge (in the fleet) that runs it."""
    source: Any
    """The inputs, or a reference to one of the edge's own batches (data.shards.ShardBatch, made
    when the batch is assigned)."""
    y: Optional[torch.Tensor] = None
    """The labels, once the central has them (never, when they stay on the edge)."""
    samples: int = 0
    """Known once the first activation arrives."""
    edge_loss: Optional[float] = None
    """Under a local loss, the edge head's loss on this batch, from the same reply."""


class Crossing(NamedTuple):
    """A tensor on the wire: what it is (the wire accounting's kind) and which cut it crosses
    (None for a batch's inputs, which enter at the first segment and cross no cut)."""
    kind: str  # inputs, activations, activation_grads
    cut: Optional[int]

    @property
    def way(self) -> str:
        return "backward" if self.kind == "activation_grads" else "forward"


class Hop(NamedTuple):
    kind: str  # relay: forward, turnaround, backward; autograd: forward, loss; local: local, turnaround;
    # evaluation: infer, score
    segment: int
    place: str

    @property
    def needs_labels(self) -> bool:
        return self.kind in ("turnaround", "loss", "score", "local")

    @property
    def evaluating(self) -> bool:
        return self.kind in ("infer", "score")


def crossing(hop: Hop, direction: str) -> Optional[Crossing]:
    """The one place that decides what crosses the wire around ``hop``: the tensor it takes in
    (``direction="in"``), or the one it hands on (``"out"``; None when it hands on nothing: a
    loss, a score, or the gradient of a batch's inputs)."""
    if direction == "in":
        if hop.kind == "backward":
            return Crossing("activation_grads", hop.segment)
        return Crossing("inputs", None) if hop.segment == 0 else Crossing("activations", hop.segment - 1)
    if hop.kind in ("forward", "infer", "local"):
        return Crossing("activations", hop.segment)
    if hop.kind in ("turnaround", "backward") and hop.segment > 0:
        return Crossing("activation_grads", hop.segment - 1)
    return None


@dataclass(frozen=True)
class Route:
    first: Hop  # the edge's forward of segment 0, before the turn
    turn: tuple[Hop, ...]  # the central's first hop to its last
    last: Optional[Hop]  # relay: the edge's backward of segment 0, after the turn

    @property
    def edge_hops_in_turn(self) -> int:
        return sum(hop.place == "edge" for hop in self.turn)


def relay_route(places: list[str]) -> Route:
    m = len(places)
    forwards = [Hop("forward", i, places[i]) for i in range(1, m - 1)]
    backwards = [Hop("backward", i, places[i]) for i in range(m - 2, 0, -1)]
    return Route(Hop("forward", 0, places[0]), (*forwards, Hop("turnaround", m - 1, places[-1]), *backwards),
                 Hop("backward", 0, places[0]))


def autograd_route(places: list[str]) -> Route:
    m = len(places)
    forwards = [Hop("forward", i, places[i]) for i in range(1, m - 1)]
    return Route(Hop("forward", 0, places[0]), (*forwards, Hop("loss", m - 1, places[-1])), None)


def local_route(places: list[str]) -> Route:
    assert places == ["edge", "central"], places  # the config refuses other plans under a local loss
    return Route(Hop("local", 0, "edge"), (Hop("turnaround", 1, "central"),), None)


def eval_route(places: list[str]) -> tuple[Hop, ...]:
    return (*(Hop("infer", i, p) for i, p in enumerate(places[:-1])), Hop("score", len(places) - 1, places[-1]))
