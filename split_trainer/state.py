"""What a checkpoint holds and how a run is put back from one: the central's segments and
optimizers, every edge's (collected over RPC: edges may share no filesystem with the central),
the RNG states, and the progress record that says where in the data the run stood."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import Config
from .fleet import Fleet
from .schedule import Side


@dataclass
class Progress:
    step: int = 0
    """Batches trained in total; the next batch is this step."""
    epoch: int = 0
    position: int = 0
    """Batches of ``epoch`` already trained: the data order is a function of (seed, epoch)."""
    seed: int = 0
    last_eval: list[float] = field(default_factory=lambda: [float("nan"), float("nan")])
    """(test loss, test accuracy) of the latest evaluation."""
    trained: list[int] = field(default_factory=list)
    """Edges that trained since the last replica sync (a checkpoint may fall between two syncs)."""


def save(cfg: Config, meta: dict[str, Any], central: Side, fleet: Fleet, progress: Progress) -> tuple[Path, int]:
    """Both sides' full state at a quiet point (no batch in flight), as checkpoint ``progress.step``;
    ``meta`` (fingerprint, job) goes into the manifest."""
    parts = {"central": {"module": central.state_dict(), "optimizers": central.optimizer_states(),
                         "rng": central.rng_state(), "progress": asdict(progress)},
             **fleet.export()}
    meta = {**meta, "epoch": progress.epoch, "position": progress.position, "config": cfg.to_dict()}
    return checkpoint.save(checkpoint.directory(cfg), progress.step, parts, meta, cfg.checkpoint.keep)


def restore(loaded: checkpoint.Loaded, central: Side, fleet: Fleet) -> Progress:
    """Continue exactly where the checkpoint was taken: weights, optimizers, RNG, data position."""
    part = loaded.parts["central"]
    central.load_state_dict(part["module"])
    central.load_optimizer_states(part["optimizers"])
    central.set_rng_state(part["rng"])
    fleet.restore(loaded.parts)
    return Progress(**part["progress"])
