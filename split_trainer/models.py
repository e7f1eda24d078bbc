"""Model registry: each architecture is a builder returning an ``nn.Sequential`` of named layers,
so that a plan (split_trainer.plan) can cut it between any two layers by name."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from .config import ConfigError, ModelConfig

Builder = Callable[[ModelConfig], nn.Sequential]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make an architecture available as ``model.name``."""
    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder
    return wrap


@register("mnist_cnn")
def mnist_cnn(cfg: ModelConfig) -> nn.Sequential:
    """The pytorch/examples MNIST CNN, as named layers (logits out; the loss is cross-entropy)."""
    def dropout(p: float) -> nn.Module:
        # Identity rather than Dropout(0): keeps layer names and the RNG stream stable.
        return nn.Dropout(p) if cfg.dropout else nn.Identity()

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, 3, 1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3, 1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("dropout1", dropout(0.25)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(9216, 128)),
        ("relu3", nn.ReLU()),
        ("dropout2", dropout(0.5)),
        ("fc2", nn.Linear(128, 10)),
    ]))


@register("tutorial_cnn")
def tutorial_cnn(cfg: ModelConfig) -> nn.Sequential:
    """The split-learning tutorial's model (its Layer_0..Layer_3), layer for layer; its own layout is
    the plan edge until pool0, central until pool1, edge until relu2, central."""
    return nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(1, 16, 3, stride=2, padding=1)),
        ("relu0", nn.ReLU()),
        ("pool0", nn.MaxPool2d(2)),
        ("conv1", nn.Conv2d(16, 32, 3, stride=2, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, stride=2, padding=1)),
        ("relu2", nn.ReLU()),
        ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, 10)),
    ]))


def build_full(cfg: ModelConfig) -> nn.Sequential:
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name {cfg.name!r} is not registered (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.name](cfg)


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One segment from its replicas: floating-point parameters and buffers averaged, integer
    buffers (counters) taken from the first."""
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}
