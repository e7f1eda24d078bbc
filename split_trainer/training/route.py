"""The route of one batch through a plan: its hops (core.hops: one segment on one side each) and
their order.

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
from typing import Optional

from split_trainer.core.hops import Hop, HopKind


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
    forwards = [Hop(HopKind.FORWARD, i, places[i]) for i in range(1, m - 1)]
    backwards = [Hop(HopKind.BACKWARD, i, places[i]) for i in range(m - 2, 0, -1)]
    return Route(Hop(HopKind.FORWARD, 0, places[0]),
                 (*forwards, Hop(HopKind.TURNAROUND, m - 1, places[-1]), *backwards),
                 Hop(HopKind.BACKWARD, 0, places[0]))


def autograd_route(places: list[str]) -> Route:
    m = len(places)
    forwards = [Hop(HopKind.FORWARD, i, places[i]) for i in range(1, m - 1)]
    return Route(Hop(HopKind.FORWARD, 0, places[0]), (*forwards, Hop(HopKind.LOSS, m - 1, places[-1])), None)


def local_route(places: list[str]) -> Route:
    assert places == ["edge", "central"], places  # the config refuses other plans under a local loss
    return Route(Hop(HopKind.LOCAL, 0, "edge"), (Hop(HopKind.TURNAROUND, 1, "central"),), None)


def eval_route(places: list[str]) -> tuple[Hop, ...]:
    return (*(Hop(HopKind.INFER, i, p) for i, p in enumerate(places[:-1])),
            Hop(HopKind.SCORE, len(places) - 1, places[-1]))
