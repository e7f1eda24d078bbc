"""Run outputs: atomic file writes, the metrics.jsonl event log, and step-window statistics."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, IO

from .config import ConfigError


def resident_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(fileobj)`` to a temporary name, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


class MetricsLog:
    """Append-only JSON lines; each line is flushed whole, so a crash loses at most the last one.

    ``keep_through=None`` starts a new log; a step keeps the records up to that step, so a run
    resumed from a checkpoint logs every step once.
    """

    def __init__(self, path: str | Path, keep_through: int | None, tensorboard_dir: Path | None = None):
        path = Path(path)
        self._tb = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
        kept = []
        if keep_through is not None and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_through:
                        kept.append(line + "\n")
                except ValueError:  # a line torn by a kill
                    pass
        write_text(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")

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


class Window:
    """Loss and throughput between reports, timed by when each step finished (not when it was logged)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.samples, self.loss_sum, self.batches = 0, 0.0, 0

    def add(self, loss: float, finished_at: float, samples: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples
        self.last = finished_at

    def take(self) -> tuple[float, float]:
        """(mean loss, samples/s) over the window, then start a new one where it ended."""
        elapsed = max(self.last - self.start, 1e-9)
        result = self.loss_sum / max(self.batches, 1), self.samples / elapsed
        self.start, self.samples, self.loss_sum, self.batches = self.last, 0, 0.0, 0
        return result
