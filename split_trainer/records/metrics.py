"""The run's records: the metrics.jsonl event log (and TensorBoard), and a process's resident memory.
What training writes into it, and when, is training.log's business."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from split_trainer.config import ConfigError
from split_trainer.core.files import write_text


def resident_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MetricsLog:
    """Append-only JSON lines; each line is flushed whole, so a crash loses at most the last one.

    ``keep_through=None`` starts a new log; a step keeps the records up to that step, so a run
    resumed from a checkpoint logs every step once.
    """

    def __init__(self, path: str | Path, keep_through: int | None, tensorboard_dir: Path | None = None):
        path = Path(path)
        self._tb = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
        kept, self.kept = [], []
        if keep_through is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a kill
                    continue
                if record.get("step", 0) <= keep_through:
                    kept.append(line + "\n")
                    self.kept.append(record)
        write_text(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")

    def last(self, event: str) -> dict[str, Any] | None:
        """The latest kept record of ``event`` (from the attempts before this one)."""
        return next((r for r in reversed(self.kept) if r.get("event") == event), None)

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            group = record.get("event", "train")
            for key, value in _flatten(record).items():
                if key not in ("step", "epoch", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{group}/{key}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def require_tensorboard() -> type:
    """torch's SummaryWriter, or a ConfigError when the optional extra is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logging.tensorboard=true needs the tensorboard extra: pip install -e \".[tensorboard]\" "
                          "(or set logging.tensorboard=false)") from None
    return SummaryWriter


def tensorboard_writer(directory: Path):
    return require_tensorboard()(log_dir=str(directory))
