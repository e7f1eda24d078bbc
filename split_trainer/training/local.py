"""Single-process training of the same model on the same batches: the reference that split
training is checked against (equivalence test) and measured against (benchmark)."""

from __future__ import annotations

import torch
from torch import nn

from split_trainer.config import Config
from split_trainer.data.batches import epoch_order
from split_trainer.data.datasets import Source
from split_trainer.model.losses import loss_fn
from split_trainer.model.plan import plan_for
from split_trainer.training.optim import lr_at, make_optimizer, set_lr


def train_local(cfg: Config, train: Source, steps: int, order_seed: int | None = None,
                device: str = "cpu") -> nn.Sequential:
    """Train the full model for ``steps`` batches in the split trainer's batch order and lr schedule
    (``order_seed``: the seed of the batch order, when it is not ``train.seed``: an edge's shard)."""
    plan = plan_for(cfg, cfg.train.seed)
    torch.set_rng_state(plan.rng_after_init)  # dropout draws as the central's do
    model = plan.full.to(device)
    optimizer = make_optimizer(cfg.train, model.parameters())
    per_epoch = -(-len(train) // cfg.data.batch_size)
    loss_of, step = loss_fn(cfg.train.loss), 0
    while step < steps:
        epoch = step // per_epoch
        set_lr(optimizer, lr_at(cfg.train, epoch))
        seed = cfg.train.seed if order_seed is None else order_seed
        for idx in epoch_order(len(train), cfg.data.batch_size, seed, epoch)[: steps - step]:
            x, y = (t.to(device) for t in train.batch(idx))
            loss = loss_of(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model
