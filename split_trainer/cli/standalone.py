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
from split_trainer.records.parts import load_parts, merged_state
from split_trainer.training.drivers import driver_named
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
    refusal = driver_named(config.get("data", {}).get("placement")).refuses_merge
    if refusal:
        raise ConfigError(f"{path} {refusal}")
    return config, config["model"], shape, merged_state(parts)


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
    model = build_model(model_cfg, shape, state, str(args.checkpoint))
    if argv[0] == "export":
        save_model(args.out, model_cfg, shape, model.state_dict())
        print(f"wrote {args.out} ({model_cfg['name']}, {sum(p.numel() for p in model.parameters())} parameters)")
        return 0
    cfg = config_from_dict(config, args.overrides)
    test_loss, test_accuracy = evaluate(model, cfg, device)
    print(f"test_loss {test_loss:.6f} test_accuracy {test_accuracy:.4f} ({args.checkpoint})")
    return 0
