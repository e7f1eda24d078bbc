"""The model of a vertical fleet (data.placement: vertical): one first segment per party, each on
its own features, and the central's segment on what the parties' activations merge into.

Party k's segment is the model's layers up to model.split, with weights drawn from (seed, k): the
parties hold different features, so their segments are different networks (of different input
shapes), never averaged. The central's segment is the model's layers after the cut, with its first
linear layer made for the merged width (``model.merge``: the parts flattened per sample, then
concatenated, summed or averaged). Merging is outside the modules, in the driver (``merge`` and
``unmerge``), so both engines and every wire type see one tensor per party, as at any cut.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from split_trainer.config import Config, ConfigError
from split_trainer.data.datasets import spec_of
from split_trainer.data.vertical import party_inputs
from split_trainer.model.models import Shape, build_full
from split_trainer.model.plan import Plan, Segment, output_shape, segment_ends

Tensor = torch.Tensor
Inputs = tuple[int, ...]
"""One record's features at one party: (channels, height, width) of an image region, or (width,) of
a table's columns."""


def party_shape(shape: Shape, inputs: Inputs) -> Shape:
    """The shape a model builder gets for a party: the data set's, with a table's width."""
    return {**shape, "in_features": inputs[0]} if len(inputs) == 1 else dict(shape)


def bottom(cfg: Config, shape: Shape, party: int, inputs: Inputs, end: int) -> nn.Sequential:
    """Party ``party``'s first segment (the model's first ``end`` layers) for features of ``inputs``
    shape, its weights drawn from (seed, party); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed * 1_000_003 + 7_919 * party)
        return build_full(cfg.model, party_shape(shape, inputs))[:end]


def merged_width(parts: list[tuple[int, ...]], how: str) -> int:
    """The width the central's segment takes: the parts flattened per sample, then merged."""
    widths = [math.prod(p) for p in parts]
    if how == "concat":
        return sum(widths)
    if len(set(widths)) > 1:
        raise ConfigError(f"model.merge={how} needs every party's activation of the same width, got "
                          f"{', '.join(map(str, widths))} values per sample: use model.merge=concat")
    return widths[0]


def top(full: nn.Sequential, end: int, width: int) -> nn.Sequential:
    """The model's layers from ``end`` on, the first linear one made anew for ``width`` inputs
    (drawn from the RNG's next values); layers before it must hold no parameters (they meet the
    merged vector, not a feature map)."""
    names, layers = list(full._modules)[end:], list(full)[end:]
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            layers[i] = nn.Linear(width, layer.out_features, bias=layer.bias is not None)
            return nn.Sequential(OrderedDict(zip(names, layers)))
        if any(True for _ in layer.parameters()):
            break
    raise ConfigError(f"data.placement=vertical: the central's segment must reach a linear layer before any layer "
                      f"with parameters (it takes the merged vector; {names[0]!r} comes first): cut later with "
                      f"model.split (mnist_cnn: pool or later)")


def width_of(central: nn.Sequential) -> int:
    """The merged width ``central`` (made by ``top``) takes: its first linear layer's."""
    return next(layer for layer in central if isinstance(layer, nn.Linear)).in_features


def merge(parts: list[Tensor], how: str) -> Tensor:
    """One batch's parts (party order) as the central's segment takes them."""
    flat = [p.flatten(1) for p in parts]
    if how == "concat":
        return torch.cat(flat, 1)
    stacked = torch.stack(flat)
    return stacked.sum(0) if how == "sum" else stacked.mean(0)


def unmerge(grad: Tensor, shapes: list[tuple[int, ...]], how: str) -> list[Tensor]:
    """The gradient of the merged batch as each party's part's gradient (the chain rule of ``merge``)."""
    if how == "concat":
        pieces: list[Tensor] = list(grad.split([math.prod(s) for s in shapes], 1))
    else:
        pieces = [grad / len(shapes) if how == "mean" else grad] * len(shapes)
    return [p.reshape(len(grad), *s).contiguous() for p, s in zip(pieces, shapes)]


def stand_in(inputs: Optional[Inputs]) -> Inputs:
    """A table's width is its party's to know: the central sizes its segment with one column and
    checks each party's real activation shape when the fleet is up (a model whose first segment's
    output width depends on its input width is refused there)."""
    return inputs if inputs is not None else (1,)


def vertical_plan(cfg: Config, seed: int, party: Optional[tuple[int, Inputs]] = None) -> Plan:
    """Party ``party`` (number, feature shape)'s first segment and the central's segment; the
    central's plan (``party`` None) carries party 1's as a stand-in."""
    shape = spec_of(cfg.data).shape()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = build_full(cfg.model, shape)
        names = list(full._modules)
        end = segment_ends(cfg.model, names)[0]
        inputs = [stand_in(party_inputs(cfg, k)) for k in range(1, cfg.topology.edges + 1)]
        parts = [output_shape(bottom(cfg, shape, k, shaped, end), shaped, torch.device("cpu"))
                 for k, shaped in enumerate(inputs, 1)]
        central = top(full, end, merged_width(parts, cfg.model.merge))
        rng = torch.get_rng_state()
    number, own = party or (1, inputs[0])
    first = bottom(cfg, shape, number, own, end)
    segments = [Segment(0, "edge", tuple(names[:end]), first), Segment(1, "central", tuple(names[end:]), central)]
    return Plan(cfg.model.name, segments, nn.Sequential(OrderedDict([*first.named_children(),
                                                                     *central.named_children()])), shape, rng)
