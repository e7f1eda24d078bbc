"""The training loss, chosen in one place (``train.loss``): every side that computes it (the
stage that holds the last segment, single-process training, evaluation, the audit) asks here."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Loss = Callable[..., torch.Tensor]
"""``loss(output, labels, reduction="mean")``, as torch.nn.functional's losses."""

LOSSES: dict[str, Loss] = {
    "cross_entropy": F.cross_entropy,  # on logits: the shipped networks end in a linear layer
    "nll": F.nll_loss,  # on log-probabilities: for networks of your own that end in log_softmax
}


def loss_fn(name: str) -> Loss:
    return LOSSES[name]
