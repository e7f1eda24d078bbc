"""Per-edge traffic and health: the bytes that crossed the wire each way, and how long calls took.

Bytes are tensor payloads (what the model implies); TensorPipe's framing and the pickled call
arguments add a few hundred bytes per call on top and are not counted.
"""

from __future__ import annotations

import statistics
import threading
from collections import Counter, deque
from typing import Any

import torch

from .failures import JobError, short

TRAIN_KINDS = ("inputs", "labels", "activations", "activation_grads", "control")


def nbytes(obj: Any) -> int:
    """Tensor payload of a (nested) call argument or reply."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


class EdgeLink:
    """What the central knows about one edge: traffic by kind, call times, batches served."""

    def __init__(self, name: str, host: str = "?"):
        self.name, self.host = name, host
        self.sent: Counter[str] = Counter()  # central -> edge
        self.received: Counter[str] = Counter()  # edge -> central
        self.cuts: Counter[tuple[int, str]] = Counter()  # (cut, forward | backward) -> bytes, both ways
        self.batches = 0
        self.failure: JobError | None = None
        self._times: deque[float] = deque(maxlen=512)
        self._lock = threading.Lock()

    @property
    def lost(self) -> bool:
        return self.failure is not None

    def fail(self, exc: BaseException, during: str = "") -> JobError:
        """Record the edge's first failure (its time names the cause later) and return it."""
        with self._lock:
            if self.failure is None:
                self.failure = exc if isinstance(exc, JobError) else JobError(f"{self.name} failed{during}: {short(exc)}")
            return self.failure

    def watch(self, fut: torch.futures.Future, during: str = "") -> torch.futures.Future:
        """Record the call's failure the moment it happens, on the RPC thread that completes it:
        the central's main thread may be stopped by SIGTERM before it reads the error itself."""
        def note(done: torch.futures.Future) -> None:
            try:
                done.value()
            except Exception as exc:
                self.fail(exc, during)
        fut.add_done_callback(note)
        return fut

    def call(self, seconds: float, sent: dict[str, int], received: dict[str, int],
             cuts: dict[tuple[int, str], int] | None = None) -> None:
        with self._lock:
            self._times.append(seconds)
            self.sent.update(sent)
            self.received.update(received)
            self.cuts.update(cuts or {})

    def round_trip_ms(self) -> tuple[float, float]:
        """(mean, p95) of the recent calls, in ms."""
        with self._lock:
            times = sorted(self._times)
        if not times:
            return float("nan"), float("nan")
        return 1000 * statistics.fmean(times), 1000 * times[min(len(times) - 1, int(0.95 * len(times)))]

    def totals(self) -> dict[str, Any]:
        return {"host": self.host, "batches": self.batches, "sent": dict(self.sent), "received": dict(self.received),
                "sent_total": sum(self.sent.values()), "received_total": sum(self.received.values())}


def statuses(links: list[EdgeLink]) -> dict[str, str]:
    """ok, slow (recent mean call time over twice the edges' median), or lost."""
    means = {link.name: link.round_trip_ms()[0] for link in links}
    known = [m for m in means.values() if m == m]
    median = statistics.median(known) if known else float("nan")
    return {link.name: "lost" if link.lost else "slow" if means[link.name] > 2 * median else "ok" for link in links}


def summary(links: list[EdgeLink], train_samples: int, cut_names: list[str]) -> dict[str, Any]:
    per_edge = {link.name: link.totals() for link in links}
    train = sum(link.sent[k] + link.received[k] for link in links for k in TRAIN_KINDS)
    per_cut = {f"after {name}": {way: sum(link.cuts[(cut, way)] for link in links) for way in ("forward", "backward")}
               for cut, name in enumerate(cut_names)}
    return {"per_edge": per_edge, "per_cut": per_cut,
            "sent_total": sum(e["sent_total"] for e in per_edge.values()),
            "received_total": sum(e["received_total"] for e in per_edge.values()),
            "train_total": train,
            "per_train_sample": train / max(train_samples, 1)}
