"""Architectures: registered builders, or a function of the user's own named by import path.

An import path runs code, so it is taken only from the person running the command (a config file
or ``--set``), never from a file the trainer reads: a checkpoint or a ``model.pt`` may come from
anyone, and one naming an import path is refused unless the user names the same path
(``check_named``, applied where such a file's model config is read: records.parts.load_parts and
cli.standalone.load_merged).

Every architecture is an ``nn.Sequential`` whose layers have names, so that a plan
(split_trainer.model.plan) can cut it between any two of them. A builder gets the model config and the
data set's shape (``in_channels``, ``image_size``, ``num_classes``), so one architecture serves
every data set of that kind.
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from split_trainer.config import ConfigError, ModelConfig, parse_override

Shape = dict[str, int]
Builder = Callable[[ModelConfig, Shape], nn.Sequential]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make an architecture available as ``model.name``."""
    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder
    return wrap


@register("mnist_cnn")
def mnist_cnn(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """The pytorch/examples MNIST CNN, as named layers (logits out; the loss is cross-entropy)."""
    def dropout(p: float) -> nn.Module:
        # Identity rather than Dropout(0): keeps layer names and the RNG stream stable.
        return nn.Dropout(p) if cfg.dropout else nn.Identity()

    side = (shape["image_size"] - 4) // 2  # two valid 3x3 convolutions, then a 2x2 max-pool
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(shape["in_channels"], 32, 3, 1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3, 1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("dropout1", dropout(0.25)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * side * side, 128)),
        ("relu3", nn.ReLU()),
        ("dropout2", dropout(0.5)),
        ("fc2", nn.Linear(128, shape["num_classes"])),
    ]))


@register("tutorial_cnn")
def tutorial_cnn(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """The split-learning tutorial's model (its Layer_0..Layer_3), layer for layer; its own layout is
    the plan edge until pool0, central until pool1, edge until relu2, central."""
    return nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(shape["in_channels"], 16, 3, stride=2, padding=1)),
        ("relu0", nn.ReLU()),
        ("pool0", nn.MaxPool2d(2)),
        ("conv1", nn.Conv2d(16, 32, 3, stride=2, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 3, stride=2, padding=1)),
        ("relu2", nn.ReLU()),
        ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, shape["num_classes"])),
    ]))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register("resnet_small")
def resnet_small(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016): a 3x3 stem, three stages of ``blocks`` basic blocks
    (16, 32, 64 channels; model.args.blocks, default 3: ResNet-20), global pooling, one linear
    layer. Cut it after ``stem`` or ``stage1``."""
    blocks = int(cfg.args.get("blocks", 3))

    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(blocks)])

    return nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(shape["in_channels"], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU())),
        ("stage1", stage(16, 16, 1)),
        ("stage2", stage(16, 32, 2)),
        ("stage3", stage(32, 64, 2)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, shape["num_classes"])),
    ]))


@register("mlp")
def mlp(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """A multilayer perceptron for tables (data.name: csv; a party's width is its
    ``in_features``): flatten, a linear layer and a ReLU per width in model.args.hidden (default
    [64, 32]: fc1 relu1 fc2 relu2), then fc3 to the classes. Cut it after relu1."""
    width = shape.get("in_features") or shape["in_channels"] * shape["image_size"] ** 2
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    hidden = [int(h) for h in cfg.args.get("hidden", [64, 32])]
    for i, out in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(width, out)), (f"relu{i}", nn.ReLU())]
        width = out
    return nn.Sequential(OrderedDict([*layers, (f"fc{len(hidden) + 1}", nn.Linear(width, shape["num_classes"]))]))


def _imported(path: str) -> Callable[..., Any]:
    module_name, _, function = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own error while importing
        raise ConfigError(f"model.name {path!r}: cannot import {module_name} ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); run from the "
                          f"folder that holds it or put it on PYTHONPATH") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"model.name {path!r}: module {module_name} has no function {function!r}")
    return fn


def _from_user(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """``package.module:function`` called with model.args, plus any of in_channels, image_size and
    num_classes that it takes and model.args does not set."""
    fn = _imported(cfg.name)
    accepted = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in shape.items() if k in accepted and k not in cfg.args}
    try:
        model = fn(**cfg.args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.name {cfg.name!r}: {exc} (model.args gives {sorted(cfg.args)})") from None
    if not isinstance(model, nn.Sequential):
        raise ConfigError(f"model.name {cfg.name!r} returned a {type(model).__name__}, not an nn.Sequential: "
                          f"return nn.Sequential(OrderedDict([(name, layer), ...])) of its layers in forward order "
                          f"(a layer may be a whole block), so that a plan can cut between them")
    return model


def build_full(cfg: ModelConfig, shape: Shape) -> nn.Sequential:
    """The whole model for a data set of ``shape``; its layer names are what plans cut at."""
    if ":" in cfg.name:
        return _from_user(cfg, shape)
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name {cfg.name!r} is not registered (known: {', '.join(sorted(_REGISTRY))}; "
                          f"or package.module:function for your own)")
    return _REGISTRY[cfg.name](cfg, shape)


def given_name(overrides: Sequence[str]) -> Optional[str]:
    """The model.name that the person running the command gave with ``--set`` (the last one wins), if any."""
    given = None
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["model", "name"]:
            given = value
    return given


def check_named(found: Any, given: Optional[str], source: str) -> None:
    """Refuse an import path that ``source`` (a checkpoint or a model file: it may come from anyone)
    names as model.name, unless the user named the same path (``given``): building it would import
    and call it, so the file would decide what code runs. Registered architectures run no code of
    the file's choosing and pass."""
    if isinstance(found, str) and ":" in found and found != given:
        raise ConfigError(f"{source} names model.name={found}, an import path: building it would run that code, so "
                          f"it runs only if you name it; if you trust this file, pass --set model.name={found}")
