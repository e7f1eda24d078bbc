"""The standalone model file (``model.pt``): the architecture's config, the data shape and the
merged state_dict, readable with ``torch.load(weights_only=True)`` and rebuilt without any
topology, torchrun or RPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from split_trainer.config import ConfigError, config_from_dict
from split_trainer.core.errors import short
from split_trainer.core.files import atomic_write
from split_trainer.core.tensors import load_weights
from split_trainer.model.models import Shape
from split_trainer.model.plan import build_plan


def save_model(path: Path, model_cfg: dict[str, Any], shape: Shape, state: dict[str, torch.Tensor]) -> None:
    saved = {"name": model_cfg["name"], "model": model_cfg, "shape": shape, "state_dict": state}
    atomic_write(path, lambda f: torch.save(saved, f))


def read_model(path: Path) -> tuple[dict[str, Any], Shape, dict[str, torch.Tensor]]:
    """(model config dict, data shape, state_dict) of a model file; a ConfigError if it is not one.
    Its model.name is the file's word, not the user's: see models.check_named before building it."""
    try:
        saved = load_weights(path.read_bytes(), str(path))
        found = saved["model"], saved["shape"], saved["state_dict"]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise ConfigError(f"{path} is not a split_trainer model file ({str(exc).splitlines()[0][:200]})") from None
    if not all(isinstance(part, dict) for part in found):  # the model config is read as a mapping from here on
        raise ConfigError(f"{path} is not a split_trainer model file (its model, shape or state_dict is no mapping)")
    return found


def build_model(model_cfg: dict[str, Any], shape: Shape, state: dict[str, torch.Tensor],
                source: str = "the model file") -> nn.Sequential:
    """The network ``model_cfg`` describes for ``shape``, with the weights ``state``; a ConfigError
    naming ``source`` when the three do not make one (they are a file's word)."""
    # The plan's model, not build_full's: model.bottleneck adds layers that only the plan inserts.
    # The seed does not matter: every weight is then loaded.
    try:
        model = build_plan(config_from_dict({"model": model_cfg}).model, shape, seed=0).full
        model.load_state_dict(state)
    except ConfigError:
        raise
    except Exception as exc:  # a shape of the wrong types, weights of another network
        raise ConfigError(f"{source}: its model config, data shape and weights make no network "
                          f"({short(exc)[:200]})") from None
    return model.eval()
