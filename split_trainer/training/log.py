"""Training's log: each batch's loss as its turn ends, and every ``logging.every_steps`` steps a
metrics line (mean loss, samples/s, bytes so far, call times per edge, memory per rank) and a line
for the person (a ``Reporter``: cli.console.Console on the command line)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Protocol

from split_trainer.core.batch import Batch
from split_trainer.records.metrics import MetricsLog, resident_bytes
from split_trainer.transport.link import LinkSnapshot, train_bytes


class Reporter(Protocol):
    """What the person running the job sees of it (cli.console.Console)."""

    def attach(self, snapshots: Callable[[], list[LinkSnapshot]]) -> None:
        """Where the edges' rows come from: the fleet's links, as they stand when drawn."""

    def print(self, text: str) -> None: ...

    def warn(self, text: str) -> None: ...

    def banner(self, rows: dict[str, Any], total_steps: int) -> None: ...

    def steps(self, step: int, epoch: int, loss: float, samples_per_s: float,
              edge_loss: Optional[float] = None) -> None: ...

    def evaluated(self, epoch: int, test_loss: float, test_accuracy: float,
                  per_edge: Optional[dict[str, float]] = None) -> None: ...

    def close(self, summary: Optional[dict[str, Any]]) -> None: ...

    def finished(self, step: int, path: Any, summary: dict[str, Any], source: str) -> None:
        """The run had already finished: its figures, from ``source``."""


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

    def __init__(self, metrics: MetricsLog, console: Reporter, fleet: Any, every: int, steps_per_epoch: int,
                 total_steps: int):
        self.metrics, self.console, self.fleet = metrics, console, fleet
        self.every, self.steps_per_epoch, self.total_steps = every, steps_per_epoch, total_steps
        # step -> (loss, when its turn ended, samples, the edge's local loss or None)
        self.losses: dict[int, tuple[float, float, int, Optional[float]]] = {}
        self.samples = 0
        self.window = Window()

    def start(self) -> None:
        self.window = Window()

    def finished(self, batch: Batch, loss: float) -> None:
        """``batch`` has had its turn, with ``loss``."""
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
                sent, received = train_bytes(self.fleet.all_snapshots())  # what left with an edge was sent too
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
