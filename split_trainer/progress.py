"""What the person running the job sees: a rich live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Console:
    def __init__(self, total_steps: int, quiet: bool = False):
        self.quiet = quiet
        self.live = sys.stdout.isatty() and not quiet
        self.out = RichConsole(highlight=False, soft_wrap=True, force_terminal=self.live or None,
                               no_color=not self.live)
        self.total = total_steps
        self.info: dict[str, str] = {}
        self._bar: Progress | None = None
        if self.live:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.out, transient=False)
            self._task = self._bar.add_task("train", total=total_steps, info="")

    def print(self, text: str) -> None:
        if not self.quiet:
            self.out.print(text)

    def warn(self, text: str) -> None:
        print(f"split_trainer: warning: {text}", file=sys.stderr, flush=True)

    def banner(self, rows: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.live:
            table = Table(title="split_trainer", show_header=False, box=None)
            for key, value in rows.items():
                table.add_row(f"[cyan]{key}", str(value))
            self.out.print(table)
            self._bar.start()
        else:
            for key, value in rows.items():
                self.out.print(f"{key}: {value}")

    def steps(self, step: int, epoch: int, loss: float, samples_per_s: float, plain: bool) -> None:
        self.info.update(epoch=str(epoch + 1), loss=f"{loss:.4f}", **{"samples/s": f"{samples_per_s:.0f}"})
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=self._line())
        elif plain and not self.quiet:
            self.out.print(f"step {step}/{self.total} {self._line()}")

    def evaluated(self, epoch: int, test_loss: float, test_accuracy: float) -> None:
        self.info["test_acc"] = f"{test_accuracy:.4f}"
        self.print(f"epoch {epoch + 1} test_loss {test_loss:.4f} test_accuracy {test_accuracy:.4f}")

    def _line(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.info.items())

    def close(self, summary: dict[str, Any] | None) -> None:
        if self._bar is not None:
            self._bar.stop()
        if summary is None:
            return
        keys = ("steps", "epochs", "test_loss", "test_accuracy", "wall_time_s", "samples_per_s")
        text = " ".join(f"{k} {summary[k]:.4f}" if isinstance(summary[k], float) else f"{k} {summary[k]}"
                        for k in keys)
        self.out.print(f"done: {text}")
