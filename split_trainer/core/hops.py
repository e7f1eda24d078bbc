"""Hops (one segment run on one side) and what crosses the wire around each: the words the
engines, the edge, the wire format, the link's accounting and the defences share.

A hop's kind says what it does, and so what it takes in and what it hands on (``crossing``):

    forward     a segment's forward (relay, autograd); its output crosses to the next side
    turnaround  the last segment's forward, the loss and its backward (relay; the central's under a
                local loss); it hands back the gradient of its input
    backward    backprop of a segment from the gradient that came in (relay); hands on the
                gradient of its input
    loss        the last segment's forward and the loss (autograd: the backward comes later)
    local       a local loss's edge hop: forward, its own head's loss, its step; the output crosses
    infer       evaluation's forward, no grad
    score       evaluation's last segment: summed loss, correct predictions, samples
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple, Optional


class HopKind(Enum):
    FORWARD = "forward"
    TURNAROUND = "turnaround"
    BACKWARD = "backward"
    LOSS = "loss"
    LOCAL = "local"
    INFER = "infer"
    SCORE = "score"

    @property
    def needs_labels(self) -> bool:
        """The hop computes a loss (or a score) on the batch's labels."""
        return self in (HopKind.TURNAROUND, HopKind.LOSS, HopKind.SCORE, HopKind.LOCAL)

    @property
    def evaluating(self) -> bool:
        return self in (HopKind.INFER, HopKind.SCORE)

    @property
    def takes_gradient(self) -> bool:
        """Its input is the gradient of the segment's output, not an activation."""
        return self is HopKind.BACKWARD

    @property
    def hands_on(self) -> Optional[str]:
        """What its output is on the wire: activations forward, activation gradients back, or
        nothing (a loss, a score)."""
        if self in (HopKind.FORWARD, HopKind.INFER, HopKind.LOCAL):
            return "activations"
        if self in (HopKind.TURNAROUND, HopKind.BACKWARD):
            return "activation_grads"
        return None


class Crossing(NamedTuple):
    """A tensor on the wire: what it is (the wire accounting's kind) and which cut it crosses
    (None for a batch's inputs, which enter at the first segment and cross no cut)."""
    kind: str  # inputs, activations, activation_grads
    cut: Optional[int]

    @property
    def way(self) -> str:
        return "backward" if self.kind == "activation_grads" else "forward"


class Hop(NamedTuple):
    kind: HopKind
    segment: int
    place: str  # edge, central

    @property
    def needs_labels(self) -> bool:
        return self.kind.needs_labels

    @property
    def evaluating(self) -> bool:
        return self.kind.evaluating


def crossing(hop: Hop, direction: str) -> Optional[Crossing]:
    """The one place that decides what crosses the wire around ``hop``: the tensor it takes in
    (``direction="in"``), or the one it hands on (``"out"``; None when it hands on nothing: a
    loss, a score, or the gradient of a batch's inputs)."""
    if direction == "in":
        if hop.kind.takes_gradient:
            return Crossing("activation_grads", hop.segment)
        return Crossing("inputs", None) if hop.segment == 0 else Crossing("activations", hop.segment - 1)
    out = hop.kind.hands_on
    if out == "activations":
        return Crossing(out, hop.segment)
    if out == "activation_grads" and hop.segment > 0:
        return Crossing(out, hop.segment - 1)
    return None
