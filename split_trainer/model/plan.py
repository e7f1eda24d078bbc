"""Cut plans: which layers of a model run where.

A plan is an ordered list of segments, each a run of consecutive layers tagged with the place it
runs on (``edge`` or ``central``); places alternate, so every boundary between two segments is a
cut that crosses the wire. ``model.split: X`` is the plan [edge until X, central to the end];
``model.plan`` spells out any other, e.g. the tutorial's edge, central, edge, central.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from split_trainer.config import Config, ConfigError, ModelConfig
from split_trainer.data.datasets import spec_of
from split_trainer.model.models import Shape, build_full

Place = Literal["edge", "central"]


@dataclass
class Segment:
    index: int
    place: Place
    layers: tuple[str, ...]
    module: nn.Sequential


@dataclass
class Plan:
    name: str
    segments: list[Segment]
    full: nn.Sequential
    shape: Shape
    """The data shape the model was built for (in_channels, image_size, num_classes)."""
    rng_after_init: torch.Tensor
    """The CPU RNG state right after the weights were drawn: where the dropout stream of a process
    that built this model and then trained it continues (the central, single-process training)."""

    @property
    def places(self) -> list[Place]:
        return [s.place for s in self.segments]

    @property
    def layout(self) -> list[tuple[str, tuple[str, ...]]]:
        """Where each layer runs: part of the fingerprint that checkpoints are checked against."""
        return [(s.place, s.layers) for s in self.segments]

    @property
    def cuts(self) -> list[str]:
        """One name per cut, the layer it follows: cut i lies between segments i and i + 1."""
        return [s.layers[-1] for s in self.segments[:-1]]

    def on(self, place: Place) -> dict[int, nn.Sequential]:
        """The segments that run on ``place``, by index."""
        return {s.index: s.module for s in self.segments if s.place == place}


def describe(layout: list) -> str:
    """``edge conv1..pool | central dropout1..fc2``: a layout in one short line."""
    return " | ".join(f"{place} {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"{place} {layers[0]}"
                      for place, layers in layout)


def _segments_of(cfg: ModelConfig) -> list[dict]:
    return cfg.plan if cfg.plan is not None else [{"place": "edge", "until": cfg.split}, {"place": "central"}]


def _check(cfg: ModelConfig, names: list[str]) -> list[int]:
    """The index one past each segment's last layer, or a ConfigError naming what is wrong."""
    spec = _segments_of(cfg)
    what = "model.plan" if cfg.plan is not None else "model.split"
    if spec[0]["place"] != "edge":
        raise ConfigError(f"{what}: the first segment runs on {spec[0]['place']}, but the inputs enter on the "
                          f"edges: make the first segment {{place: edge}}")
    for i in range(1, len(spec)):
        if spec[i]["place"] == spec[i - 1]["place"]:
            raise ConfigError(f"model.plan: segments {i} and {i + 1} both run on the {spec[i]['place']}: places "
                              f"must alternate (merge the two into one segment)")
    ends, previous = [], 0
    for i, segment in enumerate(spec, 1):
        until = segment.get("until")
        if until is None:
            end = len(names)
        elif cfg.plan is None and until not in names[:-1]:
            raise ConfigError(f"model.split {until!r} is not a layer of {cfg.name} that can end the edge "
                              f"segment (choose one of: {', '.join(names[:-1])})")
        elif until not in names:
            raise ConfigError(f"model.plan segment {i}: until {until!r} is not a layer of {cfg.name} "
                              f"(layers: {', '.join(names)})")
        else:
            end = names.index(until) + 1
        if end <= previous:
            raise ConfigError(f"{what} segment {i}: until {until!r} does not come after {names[previous - 1]!r}, "
                              f"where segment {i - 1} ends: segments follow the model's layer order "
                              f"({', '.join(names)})")
        if i < len(spec) and end == len(names):
            raise ConfigError(f"{what} segment {i} ends at the last layer {names[-1]!r}, leaving nothing for "
                              f"segment {i + 1}: choose one of: {', '.join(names[previous:-1])}")
        ends.append(end)
        previous = end
    if ends[-1] != len(names):
        raise ConfigError(f"model.plan leaves layers {', '.join(names[ends[-1]:])} of {cfg.name} to no segment: "
                          f"drop the last segment's until (it then runs to the end) or add a segment")
    return ends


def build_plan(cfg: ModelConfig, shape: Shape, seed: int) -> Plan:
    """Build the architecture for data of ``shape`` with weights from ``seed`` and cut it; the
    global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = build_full(cfg, shape)
        rng = torch.get_rng_state()
    names = list(full._modules)
    ends = _check(cfg, names)
    spec = _segments_of(cfg)
    # Slicing a Sequential keeps the layer names and shares the modules, so the segments'
    # state_dict keys are the full model's keys.
    segments, start = [], 0
    for i, (segment, end) in enumerate(zip(spec, ends)):
        segments.append(Segment(i, segment["place"], tuple(names[start:end]), full[start:end]))
        start = end
    return Plan(cfg.name, segments, full, shape, rng)


def plan_for(cfg: Config, seed: int) -> Plan:
    """The configured model for the configured data set, cut by the configured plan."""
    return build_plan(cfg.model, spec_of(cfg.data).shape(), seed)
