"""The audit's progress: a line per attack (and per decoder capacity, per cut), with its epoch,
step or round and an estimate of the time left, so that a slow audit is not taken for a hung one.

On a terminal, rich progress bars, one per attack as it starts; elsewhere (a log file, CI), a plain
line when an attack starts, about every tenth of the way and when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Watch:
    """``tick(what, done, total)`` for privacy.attacks.Tick; a context manager around the audit."""

    def __init__(self, live: Optional[bool] = None):
        self.live = sys.stdout.isatty() if live is None else live
        self.console = Console(highlight=False, force_terminal=self.live, no_color=not self.live)
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=self.console,
                             disable=not self.live)
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.said: dict[str, int] = {}

    def __enter__(self) -> "Watch":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def tick(self, what: str, done: int, total: int) -> None:
        if what not in self.started:
            self.started[what] = time.monotonic()
            self.tasks[what] = self.bars.add_task(escape(what), total=total)
        self.bars.update(self.tasks[what], completed=done)
        if not self.live:
            self._line(what, done, total)

    def _line(self, what: str, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if done not in (0, total) and self.said.get(what) == tenth:
            return
        self.said[what] = tenth
        elapsed = time.monotonic() - self.started[what]
        left = f", about {elapsed / done * (total - done):.0f} s left" if 0 < done < total else ""
        print(f"audit: {what} {done}/{total} ({elapsed:.0f} s{left})", flush=True)
