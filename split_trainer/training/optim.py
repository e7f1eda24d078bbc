"""One torch.optim optimizer per segment, built the same way on both sides, and the lr schedule."""

from __future__ import annotations

from typing import Iterable

import torch

from split_trainer.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """StepLR with a step of one epoch, as a function of the epoch: nothing to keep in sync."""
    return cfg.lr * cfg.lr_gamma ** epoch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_with(optimizer: torch.optim.Optimizer, grads: dict[torch.Tensor, torch.Tensor], lr: float) -> None:
    """Step ``optimizer`` with gradients from a distributed-autograd context (param.grad stays None)."""
    set_lr(optimizer, lr)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = grads.get(p)
    optimizer.step()
    for p in params:
        p.grad = None
