"""How a failed job ends: one line from the central that names the cause.

torchrun stops every surviving rank with SIGTERM about 0.1 s after any rank dies. The central
learns of an edge's death from its own RPCs within milliseconds, but on two busy cores that is
not always sooner than the SIGTERM, and a process killed by the signal's default action says
nothing. So the central turns SIGTERM into an exception (``Terminated``) and, before it exits,
looks for the edge failure that made torchrun stop the job.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Callable


class Terminated(BaseException):
    """SIGTERM arrived: torchrun stops every rank this way when one fails or the job is cancelled.
    A BaseException, so that no ``except Exception`` on the way up mistakes it for a call's error."""

    def __init__(self):
        super().__init__("stopped by SIGTERM: torchrun stops every rank when another rank fails (its report "
                         "names the rank) or when the job is cancelled")
        self.when = time.monotonic()


def raise_on_sigterm() -> None:
    """Raise ``Terminated`` in the main thread at the first SIGTERM; ignore any later one."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one report; torchrun SIGKILLs a rank that lingers
        raise Terminated()
    signal.signal(signal.SIGTERM, handler)


def cause_of(stop: Terminated, snapshots: Callable[[], list], in_flight: list[Future], grace_s: float) -> BaseException:
    """The earliest edge failure before the signal (``snapshots``: the central's links as they stand,
    transport.link.LinkSnapshot), else ``stop`` itself. Edges that torchrun stopped together with the
    central fail after it: not causes."""
    # An edge that died mid-call fails its driver thread within milliseconds; give the calls in flight that long.
    wait(in_flight, timeout=grace_s, return_when=FIRST_EXCEPTION)
    causes = [s.failure for s in snapshots() if s.failure is not None and s.failure.when <= stop.when]
    return min(causes, key=lambda e: e.when, default=stop)
