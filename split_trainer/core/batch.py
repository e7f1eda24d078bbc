"""The record of one training batch on its route: made by the data placement, completed by
dispatch and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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
