"""The central's link to one edge: every call it makes to that edge, each bounded by a timeout,
counted by kind and by cut, timed, and watched for failure; the edge's health (ok, slow, lost).

One ``Link`` per edge owns all of this; the console, the metrics and the failure report read a
``LinkSnapshot``, and nothing else writes a link's fields. The calls go through a ``Remote``
(transport.base): torch RPC or the in-process loopback, the same link either way.

Bytes are tensor payloads (what the model implies); TensorPipe's framing and the pickled call
arguments add a few hundred bytes per call on top and are not counted.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from split_trainer.core.errors import JobError, printable, short
from split_trainer.core.hops import Crossing, Hop, crossing
from split_trainer.transport.base import Pending, Remote
from split_trainer.transport.wire import Reply, WireFormat, nbytes

Tensor = torch.Tensor
TRAIN_KINDS = ("inputs", "labels", "activations", "activation_grads", "edge_state", "control")
Wait = Callable[[], Any]


class Tally:
    """One call's bytes: by kind each way (evaluation's as ``eval``), and by cut."""

    def __init__(self, evaluating: bool):
        self.evaluating = evaluating
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.cuts: Counter[tuple[int, str]] = Counter()

    def count(self, way: Counter[str], crossing_: Crossing, payload: Any) -> None:
        size = nbytes(payload)
        way["eval" if self.evaluating else crossing_.kind] += size
        if crossing_.cut is not None and not self.evaluating:
            self.cuts[(crossing_.cut, crossing_.way)] += size


@dataclass(frozen=True)
class LinkSnapshot:
    """What the central knows of one edge at one moment: what the console, metrics and reports read."""
    name: str
    host: str
    batches: int
    sent: dict[str, int]
    """central -> edge, bytes by kind."""
    received: dict[str, int]
    """edge -> central, bytes by kind."""
    cuts: dict[tuple[int, str], int]
    """(cut, forward | backward) -> bytes, both ways, training only."""
    mean_ms: float
    p95_ms: float
    failure: Optional[JobError] = field(default=None, compare=False)

    @property
    def lost(self) -> bool:
        return self.failure is not None

    def totals(self) -> dict[str, Any]:
        zeros = dict.fromkeys(TRAIN_KINDS, 0)  # a kind that never crossed shows as 0, not as missing
        return {"host": self.host, "batches": self.batches, "sent": {**zeros, **self.sent},
                "received": {**zeros, **self.received},
                "sent_total": sum(self.sent.values()), "received_total": sum(self.received.values())}


class Link:
    """Everything the central does with one edge."""

    def __init__(self, name: str, remote: Remote, wire: WireFormat, timeout_s: float):
        self.name, self.remote, self.wire, self.timeout_s = name, remote, wire, timeout_s
        self.host = "?"
        self.failure: Optional[JobError] = None
        self._sent: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._cuts: Counter[tuple[int, str]] = Counter()
        self._batches = 0
        self._times: deque[float] = deque(maxlen=512)
        self._lock = threading.Lock()
        self._seq = 0  # training calls sent so far: the next one's number

    # -- calls ------------------------------------------------------------------------------------
    def send(self, method: str, args: tuple = (), kind: str = "control", timeout: Optional[float] = None) -> Wait:
        """Call ``method`` on the edge object; return the wait for its result. Bytes are counted
        as ``kind`` both ways."""
        started = time.perf_counter()
        pending = self._send(method, args, "", None, timeout)

        def wait() -> Any:
            result = self._wait(pending, "")
            self._account(time.perf_counter() - started, {kind: nbytes(args)}, {kind: nbytes(result)})
            return result

        return wait

    def call(self, method: str, args: tuple = (), kind: str = "control", timeout: Optional[float] = None) -> Any:
        return self.send(method, args, kind, timeout)()

    def submit(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float,
               evaluating: bool = False) -> Callable[[], Reply]:
        """Send the edge ``work`` ((hop, input) pairs) to run in order; return the wait for its
        reply. Every tensor is counted by what it is. Training calls are numbered: the edge runs
        them in the order they were sent, however many are in flight."""
        tally, packed = Tally(evaluating), []
        for hop, tensor in work:
            into = crossing(hop, "in")
            if isinstance(tensor, Tensor):
                tensor = self.wire.encode(tensor, into)
            tally.count(tally.sent, into, tensor)
            packed.append((hop, tensor))
        tally.sent["labels"] += nbytes(labels)
        during, seq = (" in evaluation", None) if evaluating else ("", self._seq)
        self._seq += not evaluating
        started = time.perf_counter()
        pending = self._send("run", (packed, labels, lr), during, seq, None)

        def wait() -> Reply:
            reply: Reply = self._wait(pending, during)
            tally.received["labels"] += nbytes(reply.labels)
            if reply.output is not None:
                out = crossing(work[-1][0], "out")
                tally.count(tally.received, out, reply.output)
                reply = reply._replace(output=self.wire.decode(reply.output, out))
            if isinstance(reply.loss, Tensor):  # the autograd engine's loss, computed on the edge: a scalar
                tally.received["control"] += nbytes(reply.loss)
            self._account(time.perf_counter() - started, tally.sent, tally.received, tally.cuts)
            return reply

        return wait

    def run(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float,
            evaluating: bool = False) -> Reply:
        return self.submit(work, labels, lr, evaluating)()

    def step(self, context_id: int, lr: float) -> Wait:
        """Autograd engine: the edge steps its segments with the context's gradients; the wait for it."""
        return self.send("apply_step", (context_id, lr))

    def _send(self, method: str, args: tuple, during: str, seq: Optional[int], timeout: Optional[float]) -> Pending:
        try:
            pending = self.remote.send(method, args, timeout or self.timeout_s, seq)
        except Exception as exc:
            raise self.fail(exc, during) from exc
        # Record the failure the moment it happens, on the thread that completes the call: the
        # central's main thread may be stopped by SIGTERM before it reads the error itself.
        pending.on_failure(lambda exc: self.fail(exc, during))
        return pending

    def _wait(self, pending: Pending, during: str) -> Any:
        try:
            return pending.wait()
        except Exception as exc:
            raise self.fail(exc, during) from exc

    # -- state --------------------------------------------------------------------------------------
    def fail(self, exc: BaseException, during: str = "") -> JobError:
        """Record the edge's first failure (its time names the cause later) and return it."""
        with self._lock:
            if self.failure is None:
                # the edge's words (over grpc, its own message) are a peer's: no control character
                # of theirs reaches the central's log
                self.failure = exc if isinstance(exc, JobError) else \
                    JobError(f"{self.name} failed{during}: {printable(short(exc), 800)}")
            return self.failure

    def trained(self) -> None:
        """One more training batch has had its turn on this edge."""
        with self._lock:
            self._batches += 1

    def _account(self, seconds: float, sent: dict[str, int], received: dict[str, int],
                 cuts: Optional[dict[tuple[int, str], int]] = None) -> None:
        with self._lock:
            self._times.append(seconds)
            self._sent.update(sent)
            self._received.update(received)
            self._cuts.update(cuts or {})

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            times = sorted(self._times)
            mean, p95 = ((1000 * statistics.fmean(times), 1000 * times[min(len(times) - 1, int(0.95 * len(times)))])
                         if times else (float("nan"), float("nan")))
            return LinkSnapshot(self.name, self.host, self._batches, dict(self._sent), dict(self._received),
                                dict(self._cuts), mean, p95, self.failure)


def statuses(snapshots: list[LinkSnapshot]) -> dict[str, str]:
    """ok, slow (recent mean call time over twice the edges' median), or lost."""
    known = [s.mean_ms for s in snapshots if s.mean_ms == s.mean_ms]
    median = statistics.median(known) if known else float("nan")
    return {s.name: "lost" if s.lost else "slow" if s.mean_ms > 2 * median else "ok" for s in snapshots}


def summary(snapshots: list[LinkSnapshot], train_samples: int, cut_names: list[str]) -> dict[str, Any]:
    """The run's wire accounting (summary.json's ``bytes``); an edge that left a live fleet and
    joined again has a snapshot per link, added up under its name."""
    per_edge: dict[str, dict[str, Any]] = {}
    for s in snapshots:
        totals, before = s.totals(), per_edge.get(s.name)
        if before is not None:
            totals.update({key: before[key] + totals[key] for key in ("batches", "sent_total", "received_total")})
            totals.update({way: {kind: before[way].get(kind, 0) + totals[way].get(kind, 0)
                                 for kind in {**before[way], **totals[way]}} for way in ("sent", "received")})
        per_edge[s.name] = totals
    sent, received = train_bytes(snapshots)
    per_cut = {f"after {name}": {way: sum(s.cuts.get((cut, way), 0) for s in snapshots)
                                 for way in ("forward", "backward")}
               for cut, name in enumerate(cut_names)}
    return {"per_edge": per_edge, "per_cut": per_cut,
            "sent_total": sum(e["sent_total"] for e in per_edge.values()),
            "received_total": sum(e["received_total"] for e in per_edge.values()),
            "train_total": sent + received,
            "per_train_sample": (sent + received) / max(train_samples, 1)}


def train_bytes(snapshots: list[LinkSnapshot]) -> tuple[int, int]:
    """Training's bytes so far, (sent, received), over every edge."""
    return (sum(s.sent.get(k, 0) for s in snapshots for k in TRAIN_KINDS),
            sum(s.received.get(k, 0) for s in snapshots for k in TRAIN_KINDS))
