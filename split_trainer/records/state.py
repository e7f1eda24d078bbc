"""What a checkpoint holds and how a run is put back from one: the central's stage, every edge's
(collected over RPC: edges may share no filesystem with the central), and the progress record
that says where in the data the run stood."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from split_trainer.config import Config
from split_trainer.records import checkpoint
from split_trainer.training.fleet import Fleet
from split_trainer.training.stage import Stage


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
    trained: list[str] = field(default_factory=list)
    """Edges that trained since the last replica sync (a checkpoint may fall between two syncs)."""
    edges: list[str] = field(default_factory=list)
    """The edges present when this record was saved."""
    served: dict[str, int] = field(default_factory=dict)
    """Training batches each edge has taken (edge placement: its place in its own shard)."""
    steps_per_epoch: int = 0
    """The run's epoch length, fixed when it started (edge placement: the first fleet's shards)."""
    releases: dict[str, int] = field(default_factory=dict)
    """Per set of training samples (each edge's shard by name; central placement: "data"), the most
    times any one of its samples has had its activation sent to the central: the passes over it
    started, and after a failure those redone (privacy.defences.Releases). Kept for an edge that is away."""


def save(cfg: Config, meta: dict[str, Any], central: Stage, fleet: Fleet, progress: Progress) -> tuple[Path, int]:
    """Both sides' full state at a flush (no batch in flight), as checkpoint ``progress.step``;
    ``meta`` (fingerprint, job, shape) goes into the manifest."""
    edges = fleet.export(progress.step, meta["job"])  # the edges' own parts first: the central's manifest lands last
    parts = {"central": {**central.part(), "progress": asdict(progress)}}
    meta = {**meta, "epoch": progress.epoch, "position": progress.position, "config": cfg.to_dict()}
    if fleet.own_weights:  # written by each edge on its own disk; the manifest names them
        meta["edge_parts"] = edges
    else:
        parts.update(edges)
    return checkpoint.save(checkpoint.directory(cfg), progress.step, parts, meta, cfg.checkpoint.keep)


def restore(loaded: checkpoint.Loaded, central: Stage, fleet: Fleet) -> tuple[Progress, list[str]]:
    """Continue exactly where the checkpoint was taken: weights, optimizers, RNG, data position.
    An edge the checkpoint does not know starts from the average of its edges' weights with fresh
    optimizer state; one the checkpoint knows but that is away is left out. Returns the progress
    record and the edges that started from the average."""
    part = loaded.parts["central"]
    central.load_part(part)
    own = loaded.manifest.get("edge_parts")
    saved = list(own) if own is not None else [stem for stem in loaded.parts if stem != "central"]
    known = [name for name in fleet.names if name in saved]
    if own is not None:
        if not known:
            raise RuntimeError(f"none of the checkpoint's edges ({', '.join(saved)}) is present and their weights are "
                               f"only on their own disks: start at least one of them, or --resume never")
        fleet.restore_own(loaded.step, own, known)
    else:
        fleet.restore(loaded.parts, known)
    newcomers = [name for name in fleet.names if name not in saved]
    if newcomers:
        fleet.adopt(newcomers, known, [loaded.parts[name]["module"] for name in saved] if own is None else None)
    progress = Progress(**part["progress"])
    progress.trained = [name for name in progress.trained if name in fleet.names]
    return progress, newcomers
