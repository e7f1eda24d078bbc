"""A run's checkpoint parts: the central's stage with the progress record, and every edge's part
(collected over its link: edges may share no filesystem with the central; or, with edge-held
weights, written by each edge on its own disk and named in the manifest). records.state saves and
restores named stateful parts; this is what a fleet and a stage make of that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from split_trainer.config import Config
from split_trainer.core.errors import JobError
from split_trainer.core.tensors import poisoned
from split_trainer.records import checkpoint, state
from split_trainer.records.state import Progress, Stateful
from split_trainer.training.fleet import Fleet
from split_trainer.training.stage import Stage


class CentralPart:
    """The checkpoint's ``central`` part: the central's stage, and where the run stands."""

    def __init__(self, stage: Stage, progress: Progress):
        self.stage, self.progress = stage, progress

    def state_dict(self) -> dict[str, Any]:
        return {**self.stage.part(), "progress": self.progress.state_dict()}

    def load_state_dict(self, part: dict[str, Any]) -> None:
        self.stage.load_part(part)
        self.progress.load_state_dict(part["progress"])


class Exported:
    """An edge's part as its link brought it (Edge.export_state); put back by the fleet (``restore``)."""

    def __init__(self, part: dict[str, Any]):
        self.part = part

    def state_dict(self) -> dict[str, Any]:
        return self.part

    def load_state_dict(self, part: dict[str, Any]) -> None:
        self.part = part


def save(cfg: Config, meta: dict[str, Any], central: Stage, fleet: Fleet, progress: Progress) -> tuple[Path, int]:
    """Both sides' full state at a flush (no batch in flight), as checkpoint ``progress.step``;
    ``meta`` (fingerprint, job, shape) goes into the manifest. No part that holds an inf or a NaN is
    written (a step can poison weights while its own loss was finite): the run stops, and a resume
    starts from the last good checkpoint."""
    _refuse_poisoned(progress.step, {"central": central.state_dict()})
    edges = fleet.export(progress.step, meta["job"])  # the edges' own parts first: the central's manifest lands last
    if not fleet.own_weights:  # each edge refuses its own (Edge.save_part)
        _refuse_poisoned(progress.step, {name: part["module"] for name, part in edges.items()})
    parts: dict[str, Stateful] = {"central": CentralPart(central, progress)}
    meta = {**meta, "epoch": progress.epoch, "position": progress.position, "config": cfg.to_dict()}
    if fleet.own_weights:  # written by each edge on its own disk; the manifest names them
        meta["edge_parts"] = edges
    else:
        parts.update({name: Exported(part) for name, part in edges.items()})
    return state.save(checkpoint.directory(cfg), progress.step, parts, meta, cfg.checkpoint.keep)


def _refuse_poisoned(step: int, modules: dict[str, dict[str, Any]]) -> None:
    bad = poisoned(modules)
    if bad:
        raise JobError(f"step {step}: the weights of {', '.join(bad)} hold non-finite values: not checkpointed "
                       f"(run the same command to resume from the last checkpoint)")


def restore(loaded: checkpoint.Loaded, central: Stage, fleet: Fleet) -> tuple[Progress, list[str]]:
    """Continue exactly where the checkpoint was taken: weights, optimizers, RNG, data position.
    An edge the checkpoint does not know starts from the average of its edges' weights with fresh
    optimizer state; one the checkpoint knows but that is away is left out. Returns the progress
    record and the edges that started from the average."""
    progress = Progress()
    state.restore(loaded, {"central": CentralPart(central, progress)})
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
    progress.trained = [name for name in progress.trained if name in fleet.names]
    return progress, newcomers
