"""Cut plans: which layers of a model run where.

A plan is an ordered list of segments, each a run of consecutive layers tagged with the place it
runs on (``edge`` or ``central``); places alternate, so every boundary between two segments is a
cut that crosses the wire. ``model.split: X`` is the plan [edge until X, central to the end];
``model.plan`` spells out any other, e.g. the tutorial's edge, central, edge, central.
``model.bottleneck: k`` adds a learned down-projection at the end of every edge segment that sends
to the central and the matching up-projection at the start of the central segment after it.
"""

from __future__ import annotations

from collections import OrderedDict
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
    def image(self) -> tuple[int, int, int]:
        """One input sample's shape: (channels, height, width)."""
        return self.shape["in_channels"], self.shape["image_size"], self.shape["image_size"]

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


def layout_text(layout: list) -> str:
    """``edge conv1..pool | central dropout1..fc2``: a layout in one short line."""
    return " | ".join(f"{place} {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"{place} {layers[0]}"
                      for place, layers in layout)


def _segments_of(cfg: ModelConfig) -> list[dict]:
    return cfg.plan if cfg.plan is not None else [{"place": "edge", "until": cfg.split}, {"place": "central"}]


def segment_ends(cfg: ModelConfig, names: list[str]) -> list[int]:
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


def _cut_shapes(full: nn.Sequential, cuts: list[int], shape: Shape) -> dict[int, tuple[int, ...]]:
    """The per-sample shape of the activation after layer ``i`` (0-based) for each ``i`` in ``cuts``:
    the model run on one zero input, in eval mode (BatchNorm cannot train on a batch of 1, and
    dropout would draw), with every module's own mode put back after."""
    modes = {m: m.training for m in full.modules()}
    dtype = next(full.parameters(), torch.empty(0)).dtype
    x = torch.zeros(1, shape["in_channels"], shape["image_size"], shape["image_size"], dtype=dtype)
    shapes = {}
    full.eval()
    try:
        with torch.no_grad():
            for i, layer in enumerate(full):
                x = layer(x)
                if i in cuts:
                    shapes[i] = tuple(x.shape[1:])
                if i >= max(cuts):
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    return shapes


def output_shape(module: nn.Module, image: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
    """The per-sample shape of ``module``'s output on one zero input of ``image`` shape: in eval mode
    (BatchNorm cannot train on a batch of 1, and dropout would draw), its mode put back after, the
    RNG untouched."""
    was = module.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        shape = tuple(module.eval()(torch.zeros(1, *image, device=device)).shape[1:])
    module.train(was)
    return shape


def _projections(name: str, per_sample: tuple[int, ...], k: int) -> tuple[nn.Module, nn.Module]:
    """(down, up) for the activation after layer ``name``: 1x1 convolutions for a feature map,
    linear layers for a vector."""
    if len(per_sample) == 3:
        return nn.Conv2d(per_sample[0], k, 1), nn.Conv2d(k, per_sample[0], 1)
    if len(per_sample) == 1:
        return nn.Linear(per_sample[0], k), nn.Linear(k, per_sample[0])
    raise ConfigError(f"model.bottleneck: the activation after {name!r} is {tuple(per_sample)} per sample, neither "
                      f"a feature map (C, H, W) nor a vector (D): cut where it is one, or set model.bottleneck: null")


def _with_bottleneck(full: nn.Sequential, ends: list[int], places: list[Place], k: int,
                     shape: Shape) -> tuple[nn.Sequential, list[int]]:
    """``full`` with ``{layer}_down`` after the last layer of every edge segment that sends to the
    central and ``{layer}_up`` before the central's next layer, and the segments' new ends. The new
    layers' weights are the RNG's next draws, so the original layers keep their weights."""
    names = list(full._modules)
    cuts = [end - 1 for end, place in zip(ends[:-1], places) if place == "edge"]
    # The probe's forward must not move the RNG (a user's layer may draw even in eval mode).
    rng = torch.get_rng_state()
    shapes = _cut_shapes(full, cuts, shape)
    torch.set_rng_state(rng)
    layers = []
    for i, name in enumerate(names):
        layers.append((name, full[i]))
        if i in cuts:
            down, up = _projections(name, shapes[i], k)
            for extra, module in ((f"{name}_down", down), (f"{name}_up", up)):
                if extra in full._modules:
                    raise ConfigError(f"model.bottleneck: the model already has a layer named {extra!r}, the name the "
                                      f"bottleneck takes: rename that layer or set model.bottleneck: null")
                layers.append((extra, module))
    # The down-projection ends the edge segment; the up-projection opens the next one.
    new_names = [name for name, _ in layers]
    lasts = [names[end - 1] + ("_down" if end - 1 in cuts else "") for end in ends]
    new_ends = [new_names.index(last) + 1 for last in lasts]
    return nn.Sequential(OrderedDict(layers)), new_ends


def build_plan(cfg: ModelConfig, shape: Shape, seed: int) -> Plan:
    """Build the architecture for data of ``shape`` with weights from ``seed`` and cut it; the
    global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = build_full(cfg, shape)
        names = list(full._modules)
        ends = segment_ends(cfg, names)
        spec = _segments_of(cfg)
        if cfg.bottleneck is not None:
            full, ends = _with_bottleneck(full, ends, [s["place"] for s in spec], cfg.bottleneck, shape)
            names = list(full._modules)
        rng = torch.get_rng_state()
    # Slicing a Sequential keeps the layer names and shares the modules, so the segments'
    # state_dict keys are the full model's keys.
    segments, start = [], 0
    for i, (segment, end) in enumerate(zip(spec, ends)):
        segments.append(Segment(i, segment["place"], tuple(names[start:end]), full[start:end]))
        start = end
    return Plan(cfg.name, segments, full, shape, rng)


def plan_for(cfg: Config, seed: int) -> Plan:
    """The configured model for the configured data set, cut by the configured plan (the plan of
    a placement whose edges hold segments of their own comes from its driver, training.drivers)."""
    return build_plan(cfg.model, spec_of(cfg.data).shape(), seed)
