"""The run's records: the metrics.jsonl event log (and TensorBoard), and training's log of losses,
throughput, bytes and memory every ``logging.every_steps`` steps."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from split_trainer.config import ConfigError
from split_trainer.records.files import write_text
from split_trainer.transport.link import train_bytes


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


class Window:
    """Loss and throughput between reports, timed by when each step finished (not when it was logged)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.samples, self.loss_sum, self.batches, self.edge_losses = 0, 0.0, 0, []

    def add(self, loss: float, finished_at: float, samples: int, edge_loss: Optional[float] = None) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples
        self.last = finished_at
        if edge_loss is not None:
            self.edge_losses.append(edge_loss)

    def take(self) -> tuple[float, float, Optional[float]]:
        """(mean loss, samples/s, the edges' mean local loss or None) over the window, then start a
        new one where it ended."""
        elapsed = max(self.last - self.start, 1e-9)
        edge = sum(self.edge_losses) / len(self.edge_losses) if self.edge_losses else None
        result = self.loss_sum / max(self.batches, 1), self.samples / elapsed, edge
        self.start, self.samples, self.loss_sum, self.batches, self.edge_losses = self.last, 0, 0.0, 0, []
        return result


class TrainLog:
    """Training's record: each batch's loss as its turn ends, and every ``every`` steps a metrics
    line (mean loss, samples/s, bytes so far, call times per edge, memory per rank) and a console
    line."""

    def __init__(self, metrics: MetricsLog, console: Any, fleet: Any, every: int, steps_per_epoch: int,
                 total_steps: int):
        self.metrics, self.console, self.fleet = metrics, console, fleet
        self.every, self.steps_per_epoch, self.total_steps = every, steps_per_epoch, total_steps
        # step -> (loss, when its turn ended, samples, the edge's local loss or None)
        self.losses: dict[int, tuple[float, float, int, Optional[float]]] = {}
        self.samples = 0
        self.window = Window()

    def start(self) -> None:
        self.window = Window()

    def finished(self, batch: Any, loss: float) -> None:
        """``batch`` (training.route.Batch) has had its turn, with ``loss``."""
        self.losses[batch.step] = (loss, time.perf_counter(), batch.samples, batch.edge_loss)

    def span(self, span: list) -> None:
        """Account a span's batches (between two flushes) in step order, writing the lines that fall in it."""
        for batch in span:
            loss, when, samples, edge_loss = self.losses.pop(batch.step)
            self.window.add(loss, when, samples, edge_loss)
            self.samples += samples
            step = batch.step + 1
            if step % self.every == 0 or step == self.total_steps:
                loss, speed, edge_loss = self.window.take()
                epoch = batch.step // self.steps_per_epoch
                links = self.fleet.snapshots()
                sent, received = train_bytes(links)
                local = {} if edge_loss is None else {"edge_loss": edge_loss}
                self.metrics.write(step=step, epoch=epoch + 1, loss=loss, **local, samples_per_s=speed,
                                   bytes_sent=sent, bytes_received=received,
                                   call_ms={link.name: round(link.mean_ms, 3) for link in links},
                                   rss_mb=self._memory_mb())
                self.console.steps(step, epoch, loss, speed, edge_loss)

    def _memory_mb(self) -> dict[str, float]:
        """Resident memory of every rank: flat in a healthy run (contexts and futures are released)."""
        sizes = [resident_bytes(), *self.fleet.memory_bytes()]
        return {name: round(b / 2**20, 1) for name, b in zip(["central", *self.fleet.names], sizes)}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.window.start += time.perf_counter() - started

    def close(self) -> None:
        self.metrics.close()
