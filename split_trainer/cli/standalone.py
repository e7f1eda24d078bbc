"""The merged model outside the cluster: ``evaluate`` and ``export`` in one process, no RPC.

    python -m split_trainer evaluate --checkpoint PATH [--set data.root=DIR]
    python -m split_trainer export --checkpoint PATH --out model.pt

PATH is a checkpoint folder (``.../checkpoints/step_NNNNNNNN``), a checkpoint directory (its
newest complete checkpoint is used) or a run's ``model.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from split_trainer.config import Config, ConfigError, config_from_dict
from split_trainer.data.batches import index_batches
from split_trainer.data.datasets import load
from split_trainer.model.losses import loss_fn
from split_trainer.model.model_file import build_model, read_model, save_model
from split_trainer.model.models import Shape, check_named, given_name
from split_trainer.records import checkpoint
from split_trainer.training.stage import average_states
from split_trainer.transport.topology import device_for


def load_merged(path: Path, edge_parts: Optional[Path] = None, overrides: Sequence[str] = ()
                ) -> tuple[dict[str, Any], dict[str, Any], Shape, dict[str, torch.Tensor]]:
    """(config dict or {}, model config dict, data shape, merged state_dict) from a checkpoint or a
    model file. A checkpoint whose edges kept their own parts is merged with those found under
    ``edge_parts`` (default: the checkpoint directory), in ``edges/<name>/``.

    Every file-borne model config enters here or in ``load_parts``, so there is where an import path
    as model.name is refused unless ``overrides`` (the user's ``--set``; none by default) name it
    (models.check_named)."""
    if path.is_file():
        model_cfg, shape, state = read_model(path)
        check_named(model_cfg.get("name"), given_name(overrides), str(path))
        return {}, model_cfg, shape, state
    config, shape, parts = load_parts(path, edge_parts, overrides)
    if config.get("data", {}).get("placement") == "vertical":
        raise ConfigError(f"{path} is a vertical run's: one first segment per party, not replicas of one model to "
                          f"merge; its own evaluation is in metrics.jsonl, and the audit attacks each party "
                          f"(docs/vertical.md)")
    return config, config["model"], shape, merged_state(parts)


def merged_state(parts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state_dict from a checkpoint's parts: the edge replicas averaged, the central's."""
    edges = [parts[name]["module"] for name in sorted(parts) if name != "central"]
    return {**average_states(edges), **parts["central"]["module"]}


def load_parts(path: Path, edge_parts: Optional[Path] = None, overrides: Sequence[str] = ()
               ) -> tuple[dict[str, Any], Shape, dict[str, Any]]:
    """(config dict, data shape, every part by name: central, edge1, ...) of a checkpoint, the edges'
    own parts found under ``edge_parts`` when they kept them."""
    loaded = _checkpoint_at(path)
    config, shape = loaded.manifest.get("config"), loaded.manifest.get("shape")
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(shape, dict)
            and "central" in loaded.parts):
        raise ConfigError(f"{loaded.path} is not a central's checkpoint (no config, shape or central part): pass a "
                          f"run's checkpoints folder, a step_NNNNNNNN folder in it or a model.pt")
    check_named(config["model"].get("name"), given_name(overrides), str(loaded.path))
    parts = loaded.parts
    if "edge_parts" in loaded.manifest:
        parts = {**parts, **_edge_parts(loaded, edge_parts or loaded.path.parent)}
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


def evaluate(model: nn.Module, cfg: Config, device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy on the configured test split, batched as in training."""
    _, test, _ = load(cfg.data)
    model.to(device)
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for idx in index_batches(len(test), cfg.data.eval_batch_size):
            x, y = (t.to(device) for t in test.batch(idx))
            logits = model(x)
            loss_sum += loss_fn(cfg.train.loss)(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(test), correct / len(test)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m split_trainer {argv[0]}")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder, checkpoint dir or model.pt")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the model runs (evaluate); a checkpoint from a GPU run loads anywhere")
    parser.add_argument("--edge-parts", type=Path, metavar="DIR",
                        help="privacy.edge_weights=edges: the folder holding edges/<name>/ as the edges wrote them "
                             "(default: the checkpoint directory)")
    if argv[0] == "export":
        parser.add_argument("--out", required=True, type=Path, help="where to write the standalone model file")
    args = parser.parse_args(argv[1:])
    device = device_for(args.device, "--device", 0)
    if not args.checkpoint.exists():
        raise ConfigError(f"--checkpoint {args.checkpoint} does not exist")
    config, model_cfg, shape, state = load_merged(args.checkpoint, args.edge_parts, args.overrides)
    model = build_model(model_cfg, shape, state)
    if argv[0] == "export":
        save_model(args.out, model_cfg, shape, model.state_dict())
        print(f"wrote {args.out} ({model_cfg['name']}, {sum(p.numel() for p in model.parameters())} parameters)")
        return 0
    cfg = config_from_dict(config, args.overrides)
    test_loss, test_accuracy = evaluate(model, cfg, device)
    print(f"test_loss {test_loss:.6f} test_accuracy {test_accuracy:.4f} ({args.checkpoint})")
    return 0
