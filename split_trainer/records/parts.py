"""A checkpoint's parts where one process reads them (``evaluate``, ``export``, ``audit``): the
central's part, each edge's (from the checkpoint, or from the folders the edges wrote their own
to), the config and data shape its manifest carries, and the merged model's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from split_trainer.config import ConfigError
from split_trainer.core.tensors import average_states
from split_trainer.model.models import Shape, check_named, given_name
from split_trainer.records import checkpoint

LOCATION = ("root", "download", "download_timeout_s")
"""The data section's keys that say where data is read or fetched from, not what it is."""


def merged_state(parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint's parts: the edge replicas averaged, the central's."""
    edges = [parts[name]["module"] for name in sorted(parts) if name != "central"]
    return {**average_states(edges), **parts["central"]["module"]}


def load_parts(path: Path, edge_parts: Optional[Path] = None, overrides: Sequence[str] = ()
               ) -> tuple[dict[str, Any], Shape, dict[str, Any]]:
    """(config dict, data shape, every part by name: central, edge1, ...) of a checkpoint, the edges'
    own parts found under ``edge_parts`` when they kept them. The config holds no data location
    (``LOCATION``): a checkpoint, perhaps someone else's, says what the model was trained on, never
    where this machine reads or downloads data; that is the user's (the defaults, or ``--set``)."""
    loaded = _checkpoint_at(path)
    config, shape = loaded.manifest.get("config"), loaded.manifest.get("shape")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(shape, dict)
            and "central" in loaded.parts):
        raise ConfigError(f"{loaded.path} is not a central's checkpoint (no config, shape or central part): pass a "
                          f"run's checkpoints folder, a step_NNNNNNNN folder in it or a model.pt")
    check_named(config["model"].get("name"), given_name(overrides), str(loaded.path))
    if isinstance(config.get("data"), dict):
        config = {**config, "data": {k: v for k, v in config["data"].items() if k not in LOCATION}}
    parts = loaded.parts
    if "edge_parts" in loaded.manifest:
        parts = {**parts, **_edge_parts(loaded, edge_parts or loaded.path.parent)}
    if len(parts) < 2:
        raise ConfigError(f"{loaded.path} holds no edge's part: not a checkpoint this trainer wrote")
    for name, part in parts.items():  # a file's word: the shape every reader below relies on
        module = part.get("module") if isinstance(part, dict) else None
        if not (isinstance(module, dict) and all(isinstance(t, torch.Tensor) for t in module.values())):
            raise ConfigError(f"{loaded.path}: its part {name} holds no module state (a mapping of tensors): not a "
                              f"checkpoint this trainer wrote")
    return config, shape, parts


def _checkpoint_at(path: Path) -> checkpoint.Loaded:
    """The checkpoint folder ``path``, or the newest complete one in the checkpoint directory ``path``."""
    if path.is_dir() and not (path / checkpoint.MANIFEST).is_file():
        loaded = checkpoint.find_resumable(path, warn=lambda text: print(f"split_trainer: warning: {text}"))
        if loaded is None:
            raise ConfigError(f"{path} holds no complete checkpoint: pass a step_NNNNNNNN folder or a model.pt")
        return loaded
    return checkpoint.resolve(str(path), path.parent, warn=print)


def _edge_parts(loaded: checkpoint.Loaded, root: Path) -> dict[str, Any]:
    """Each edge's own part of ``loaded``'s step, verified against the central's manifest. The edge
    names are edgeK (checkpoint.load refuses others), so ``edges/<name>/`` stays under ``root``."""
    parts = {}
    for name, written in loaded.manifest["edge_parts"].items():
        folder = root / "edges" / name / loaded.path.name
        try:
            part = checkpoint.load(folder)
        except ValueError as exc:
            raise ConfigError(f"{name}'s part of {loaded.path}: {exc}; pass --edge-parts DIR, the folder that holds "
                              f"edges/{name}/ as that edge wrote it") from None
        if part.manifest["files"].get(f"{name}.pt", {}).get("sha256") != written["sha256"]:
            raise ConfigError(f"{folder} is not the part {loaded.path} names (another run's?): pass the right "
                              f"--edge-parts DIR")
        parts[name] = part.parts[name]
    return parts
