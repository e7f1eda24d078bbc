"""The errors a run reports as one line: a usage or configuration mistake (exit 2), and a failure
of the distributed job already phrased for the person."""

from __future__ import annotations

import sys
import time


class ConfigError(ValueError):
    """A usage or configuration mistake: reported as one line, exit code 2."""


class JobError(RuntimeError):
    """A failure of the distributed job, already phrased for the one-line report."""

    def __init__(self, message: str):
        super().__init__(message)
        self.when = time.monotonic()


class EdgeRefusal(JobError):
    """An edge's own policy refuses what the central asked of it (training.policy): the edge's own
    line, printed on its side and repeated by the central."""


def short(exc: BaseException) -> str:
    """The first line of an error, for a one-line report (long enough for an edge's refusal that
    names every key it differs on: training.policy)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:800]


def printable(text: object, limit: int = 100) -> str:
    """``text`` from a peer (a host name, an edge's word), fit for one line of ours: control
    characters escaped (a newline or an ANSI code would forge a line of the log), at most ``limit``."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit])


def say(line: str) -> None:
    """One line on stderr in a single write. print() writes the text and its newline apart when
    stderr is unbuffered (PYTHONUNBUFFERED), and a warning from another thread (TensorPipe's C++
    logs) then lands inside the line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
