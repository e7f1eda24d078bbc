"""Model registry and split plans.

An architecture is registered as a builder returning an ``nn.Sequential`` of named layers.
A plan cuts it into an ordered list of segments, each tagged with where it runs. The core
trainer runs plans of the form [edge, central]; plans with more cuts (U-shaped, alternating)
are lists of the same kind, so they extend this module rather than replace it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .config import ConfigError, ModelConfig

Place = Literal["edge", "central"]
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


@dataclass
class Segment:
    place: Place
    layers: tuple[str, ...]
    module: nn.Sequential


@dataclass
class ModelPlan:
    name: str
    segments: list[Segment]
    full: nn.Sequential

    @property
    def layout(self) -> list[tuple[str, tuple[str, ...]]]:
        """Where each layer runs: part of the fingerprint that checkpoints are checked against."""
        return [(s.place, s.layers) for s in self.segments]


def build_full(cfg: ModelConfig) -> nn.Sequential:
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name {cfg.name!r} is not registered (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.name](cfg)


def build_plan(cfg: ModelConfig, seed: int) -> ModelPlan:
    """Build the architecture with weights from ``seed`` and cut it after layer ``cfg.split``."""
    torch.manual_seed(seed)
    full = build_full(cfg)
    names = list(full._modules)
    if cfg.split not in names[:-1]:
        raise ConfigError(f"model.split {cfg.split!r} is not a layer of {cfg.name} that can end the edge "
                          f"segment (choose one of: {', '.join(names[:-1])})")
    cut = names.index(cfg.split) + 1
    # Slicing a Sequential keeps the layer names and shares the modules, so the segments'
    # state_dict keys are the full model's keys.
    segments = [Segment("edge", tuple(names[:cut]), full[:cut]),
                Segment("central", tuple(names[cut:]), full[cut:])]
    return ModelPlan(cfg.name, segments, full)


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One segment from its replicas: floating-point parameters and buffers averaged, integer
    buffers (counters) taken from the first."""
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}


def edge_segment(cfg: ModelConfig, seed: int = 0) -> nn.Sequential:
    """The edge segment alone (its weights are replaced by the central's right after)."""
    return next(s.module for s in build_plan(cfg, seed).segments if s.place == "edge")
