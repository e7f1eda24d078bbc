"""What the person running the job sees.

On a terminal: a rich live view, a progress bar for the whole run and a table with one row per
edge (host, batches served, call times, bytes each way, status). Without one (CI, nohup, a
file): no control codes, one plain line every ``logging.every_steps`` steps. ``--quiet``: only
errors and the final summary.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from rich.console import Console as RichConsole, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from split_trainer.core.errors import say
from split_trainer.transport.link import LinkSnapshot, statuses

STYLE = {"ok": "green", "slow": "yellow", "lost": "bold red"}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Console:
    def __init__(self, quiet: bool = False, live: bool | None = None):
        self.quiet = quiet
        self.live = (sys.stdout.isatty() if live is None else live) and not quiet
        self.out = RichConsole(highlight=False, soft_wrap=not self.live, force_terminal=self.live,
                               no_color=not self.live)
        self.total = 0
        self.info: dict[str, str] = {}
        self.snapshots: Callable[[], list[LinkSnapshot]] = list
        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             TextColumn("{task.fields[info]}"), console=self.out)
        self._task = self._bar.add_task("train", total=None, info="")
        self._live: Live | None = None

    def attach(self, snapshots: Callable[[], list[LinkSnapshot]]) -> None:
        """Where the edges' rows come from: the fleet's links, as they stand when drawn."""
        self.snapshots = snapshots

    def print(self, text: str) -> None:
        if not self.quiet:
            self.out.print(text)

    def warn(self, text: str) -> None:
        say(f"split_trainer: warning: {text}")

    def banner(self, rows: dict[str, Any], total_steps: int) -> None:
        self.total = total_steps
        self._bar.update(self._task, total=total_steps)
        if self.quiet:
            return
        if not self.live:
            for key, value in rows.items():
                self.out.print(f"{key}: {value}")
            return
        table = Table(title="split_trainer", show_header=False, box=None)
        for key, value in rows.items():
            table.add_row(f"[cyan]{key}", str(value))
        self.out.print(table)
        self._live = Live(self, console=self.out, refresh_per_second=4)
        self._live.start()

    def __rich__(self) -> Group:
        """Redrawn by the live view a few times a second."""
        return Group(self._bar, self.edge_table())

    def edge_table(self) -> Table:
        table = Table(title=None, header_style="bold")
        for column in ("edge", "host", "batches", "call ms (mean)", "call ms (p95)", "sent", "received", "status"):
            table.add_column(column, justify="left" if column in ("edge", "host", "status") else "right")
        links = self.snapshots()
        state = statuses(links)
        for link in links:
            status = state[link.name]
            table.add_row(link.name, link.host, str(link.batches), f"{link.mean_ms:.1f}", f"{link.p95_ms:.1f}",
                          _mb(sum(link.sent.values())), _mb(sum(link.received.values())),
                          f"[{STYLE[status]}]{status}")
        return table

    def steps(self, step: int, epoch: int, loss: float, samples_per_s: float,
              edge_loss: Optional[float] = None) -> None:
        state = statuses(self.snapshots()).values()
        local = {} if edge_loss is None else {"edge loss": f"{edge_loss:.4f}"}  # train.edge_loss: local
        self.info.update({"epoch": str(epoch + 1), "loss": f"{loss:.4f}", **local, "samples/s": f"{samples_per_s:.0f}",
                          "edges ok": f"{sum(s == 'ok' for s in state)}/{len(state)}"})
        self._bar.update(self._task, completed=step, info=self._line())
        if self._live is None and not self.quiet:
            self.out.print(f"step {step}/{self.total} {self._line()}")

    def evaluated(self, epoch: int, test_loss: float, test_accuracy: float,
                  per_edge: dict[str, float] | None = None) -> None:
        self.info["test_acc"] = f"{test_accuracy:.4f}"
        edges = f" ({', '.join(f'{k} {v:.4f}' for k, v in per_edge.items())})" if per_edge else ""
        self.print(f"epoch {epoch + 1} test_loss {test_loss:.4f} test_accuracy {test_accuracy:.4f}{edges}")

    def _line(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.info.items())

    def close(self, summary: dict[str, Any] | None) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self.live and self.snapshots():
            self.out.print(self.edge_table())  # the final state, or who was lost
        if summary is None:
            return
        self.out.print(f"done: {figures(summary)}")

    def finished(self, step: int, path: Any, summary: dict[str, Any], source: str) -> None:
        """The same command again on a finished run: one line that says so, then its figures."""
        self.out.print(f"already finished: the checkpoint at step {step} ({path}) ends this run; nothing was trained, "
                       f"evaluated or written (--resume never, or another output.run_dir, starts a new run)")
        self.out.print(f"done: {figures(summary)} (from {source})")


def figures(summary: dict[str, Any]) -> str:
    """A run's figures in one line, those its summary has (a progress record has no timings or bytes)."""
    keys = [k for k in ("steps", "epochs", "test_loss", "test_accuracy", "wall_time_s", "samples_per_s")
            if k in summary]
    text = " ".join(f"{k} {summary[k]:.4f}" if isinstance(summary[k], float) else f"{k} {summary[k]}" for k in keys)
    if "bytes" in summary:
        text += f" bytes/sample {summary['bytes']['per_train_sample']:,.0f}"
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon") is not None:  # the releases counted, not the epochs planned
        text += f" epsilon {privacy['epsilon']:.4g} delta {privacy['delta']:g}"
        text += f" releases {privacy['releases']}" if "releases" in privacy else ""
    return text
