"""What a checkpoint holds: named stateful parts, each saved under its name and put back from it
(the shape of torchtitan's ``CheckpointManager`` over ``Stateful`` objects), and the progress
record that says where in the data the run stood. Which parts a run has (the central's stage, each
edge's part) is the training side's business (training.checkpointing)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Protocol

from split_trainer.records import checkpoint


class Stateful(Protocol):
    """A part of a checkpoint: what it saves, and how it is put back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


def save(directory: Path, step: int, parts: Mapping[str, Stateful], meta: dict[str, Any],
         keep: int) -> tuple[Path, int]:
    """Every part's state under its name, as checkpoint ``step`` in ``directory`` (records.checkpoint:
    atomic, verified, the newest ``keep`` kept); returns (folder, bytes written)."""
    return checkpoint.save(directory, step, {name: part.state_dict() for name, part in parts.items()}, meta, keep)


def restore(loaded: checkpoint.Loaded, parts: Mapping[str, Stateful]) -> None:
    """Put every part back from its own state in ``loaded``."""
    for name, part in parts.items():
        part.load_state_dict(loaded.parts[name])
