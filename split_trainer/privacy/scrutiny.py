"""An edge's check of the gradients the central sends back (``privacy.hijack_check``): does the
central train the task, or steer the edge segment its own way?

An honest central sends, for each sample, the gradient of the task's loss at the cut, and that
gradient depends on the sample's label: the gradients of two samples of one class point more alike
than those of two classes. A central that sends gradients of its own choosing (the feature-space
hijacking attack, privacy.hijacking, which trains the edge against a discriminator that never sees
a label) loses that link. The edge measures it per batch as the *label gap*, the mean cosine
similarity of its gradients within classes minus across classes, keeps a moving average over its
last batches, and stops in one line when the average falls below the threshold. It is the
idea of the gradient scrutinizer (Fu et al., NDSS 2023) in its simplest form, on what the edge
holds anyway: its labels and the gradients it receives. It needs no change of protocol and costs
the honest run nothing; an attacker who shapes its gradients by class could pass it (the paper's
adaptive attacks), which docs/privacy.md says.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.nn.functional as F

from split_trainer.core.errors import EdgeRefusal

Tensor = torch.Tensor
SMOOTHING = 0.1  # the moving average's weight on each new batch: about its last 10 batches
AT_LEAST = 5  # batches seen before a verdict: one odd batch is not a central


def label_gap(grads: Tensor, labels: Tensor) -> Optional[float]:
    """Mean cosine similarity of the per-sample gradients within classes minus across classes
    (None for a batch with no pair of either kind)."""
    flat = F.normalize(grads.detach().flatten(1).float(), dim=1)
    similar = flat @ flat.T
    same = labels.view(-1, 1) == labels.view(1, -1)
    within = same & ~torch.eye(len(labels), dtype=torch.bool, device=same.device)
    if not within.any() or same.all():
        return None
    return float(similar[within].mean() - similar[~same].mean())


class GradientCheck:
    """One edge's check: ``forward(labels)`` for each training batch as it leaves, ``backward(grad)``
    as its gradient comes back (in the same order: training calls are run in the order sent)."""

    def __init__(self, name: str, threshold: float):
        self.name, self.threshold = name, threshold
        self.pending: deque[Optional[Tensor]] = deque()
        self.average: Optional[float] = None
        self.batches, self.lowest = 0, float("inf")
        self.verdict: Optional[str] = None

    def forward(self, labels: Optional[Tensor]) -> None:
        self.refuse_if_caught()
        self.pending.append(labels)

    def backward(self, grads: Tensor) -> None:
        self.refuse_if_caught()
        labels = self.pending.popleft() if self.pending else None
        gap = None if labels is None or len(labels) != len(grads) else label_gap(grads, labels)
        if gap is None:
            return
        self.average = gap if self.average is None else (1 - SMOOTHING) * self.average + SMOOTHING * gap
        self.batches += 1
        self.lowest = min(self.lowest, self.average)
        if self.batches >= AT_LEAST and self.average < self.threshold:
            self.verdict = (f"{self.name} stops: the central's gradients no longer depend on the labels (label gap "
                            f"{self.average:.3f} over its last batches, below privacy.hijack_check="
                            f"{self.threshold:g}, after {self.batches} batches): it is sending gradients of its own "
                            f"choosing, as a hijacking central does (docs/privacy.md#a-malicious-central)")
            self.refuse_if_caught()

    def refuse_if_caught(self) -> None:
        if self.verdict is not None:
            raise EdgeRefusal(self.verdict)
