"""The schedule: which edge runs which batch of a span (the batches between two flushes), and in
which order batches take the central's turn (``train.dispatch``), with the classes that hand out
turns.

    round_robin  batch i to edge i mod N (central placement with more edges than
                 train.edges_per_sync: among that many at a time, data.placement.edge_of; edge
                 placement: the shards' rotation); turns in step order. A run is a function of
                 its seed and config.
    free_first   the next batch to whichever of the span's takers asks first (an edge asks when
                 its previous batch has had its turn); the turn to whichever batch is ready first.
                 A slow edge takes fewer batches and holds no one's turn; which edge trains which
                 batch, and the turn order, follow the timing, so runs are not bit-reproducible.

Either way a batch is *assigned* (``Placement.assign``) on the driver thread of the edge that runs
it, in that edge's order: an edge-held batch gets its place in that edge's own shard only then.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from itertools import cycle
from typing import Callable, Iterable, Iterator, Optional

from split_trainer.core.batch import Batch
from split_trainer.core.errors import JobError

Assign = Callable[[Batch], Batch]


class Queue:
    """A span's batches under free_first: whoever asks takes the next one. An edge that leaves a
    live fleet gives back what it took and had not finished (its turn not taken), to the front, so
    that the others train it: no batch is lost and none is trained twice."""

    def __init__(self, span: list[Batch]):
        self.batches, self.lock = deque(span), threading.Lock()
        self.taken: dict[int, dict[int, Batch]] = {}  # edge -> its batches not finished, by step

    def __len__(self) -> int:
        return len(self.batches)

    def turns(self, timeout_s: float) -> "Turns":
        """The central's turns for one pass over what is left (free first: whichever batch is ready)."""
        return FirstCome(timeout_s)

    def shares(self, edges: int, assign: Assign, takers: list[int]) -> list[Iterable[Batch]]:
        """Per edge, the batches its driver thread runs (an empty list: none); only ``takers`` ask."""
        return [self._asks(k, assign) if k in takers else [] for k in range(edges)]

    def _asks(self, k: int, assign: Assign) -> Iterator[Batch]:
        while True:
            with self.lock:
                if not self.batches:
                    return
                batch = self.batches.popleft()
                self.taken.setdefault(k, {})[batch.step] = batch
            yield assign(dataclasses.replace(batch, edge=k))

    def finished(self, batch: Batch) -> None:
        with self.lock:
            self.taken.get(batch.edge, {}).pop(batch.step, None)

    def give_back(self, k: int) -> int:
        """Edge k's unfinished batches back to the front, in step order; how many."""
        with self.lock:
            back = sorted(self.taken.pop(k, {}).values(), key=lambda b: b.step)
            self.batches.extendleft(reversed(back))
        return len(back)


class Rotation(Queue):
    """A span's batches under round_robin: each to the edge its placement gave it (``batch.edge``),
    or, where that edge is not among the takers (it left a live fleet), to the takers in turn, in
    step order; the central's turns in step order. An edge that leaves gives back its unfinished
    batches; they leave this pass's turns, so the others go on, and the next pass hands them
    round. Which edge trains which batch follows from the membership alone: the same joins and
    leaves at the same batches give the same run."""

    def __init__(self, span: list[Batch]):
        super().__init__(span)
        self.pass_turns: Optional[Turns] = None

    def turns(self, timeout_s: float) -> "Turns":
        steps = sorted(batch.step for batch in self.batches)
        self.pass_turns = Turns(steps[0], timeout_s, skip=set(range(steps[0], steps[-1] + 1)) - set(steps))
        return self.pass_turns

    def shares(self, edges: int, assign: Assign, takers: list[int]) -> list[Iterable[Batch]]:
        lanes: list[list[Batch]] = [[] for _ in range(edges)]
        spare = cycle(takers)
        with self.lock:
            for batch in sorted(self.batches, key=lambda b: b.step):
                k = batch.edge if batch.edge in takers else next(spare)
                lanes[k].append(batch)
                self.taken.setdefault(k, {})[batch.step] = batch
            self.batches.clear()
        return [map(assign, [dataclasses.replace(b, edge=k) for b in lane]) if lane else []
                for k, lane in enumerate(lanes)]

    def give_back(self, k: int) -> int:
        with self.lock:
            steps = list(self.taken.get(k, {}))
        if self.pass_turns is not None:
            self.pass_turns.withdraw(steps)  # the others' turns no longer wait for them
        return super().give_back(k)


def queue(mode: str, span: list[Batch]) -> Queue:
    """The span's batches as ``train.dispatch`` hands them out."""
    return Rotation(span) if mode == "round_robin" else Queue(span)


class Turns:
    """Hands a turn to numbered comers strictly in order (the central's turn to batches in dispatch
    order; an edge's to the training calls in the order they were sent); ``fail`` releases every waiter."""

    def __init__(self, first: int, timeout_s: float, what: str = "batch {} waited {:g} s for the central's turn",
                 skip: Iterable[int] = ()):
        self.next, self.timeout_s, self.failed, self.what = first, timeout_s, False, what
        self.skip = set(skip)  # numbers that will not come (withdrawn): their turn passes on
        self.cond = threading.Condition()
        self._pass_skipped()

    def wait(self, step: int) -> None:
        with self.cond:
            ready = self.cond.wait_for(lambda: self.failed or self.next == step, self.timeout_s)
            if self.failed:
                raise JobError("aborted: another edge failed")
            if not ready:
                raise JobError(self.what.format(step, self.timeout_s))

    def done(self, step: int) -> None:
        with self.cond:
            self.next = step + 1
            self._pass_skipped()
            self.cond.notify_all()

    def withdraw(self, steps: Iterable[int]) -> None:
        """``steps`` will not come in this pass: the turn passes over them."""
        with self.cond:
            self.skip.update(steps)
            self._pass_skipped()
            self.cond.notify_all()

    def _pass_skipped(self) -> None:
        while self.next in self.skip:
            self.next += 1

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class FirstCome(Turns):
    """The central's turn to whichever batch is ready first (train.dispatch: free_first): still one
    batch at a time, each seeing the weights every earlier turn left."""

    def __init__(self, timeout_s: float):
        super().__init__(0, timeout_s)
        self.busy = False

    def wait(self, step: int) -> None:
        with self.cond:
            ready = self.cond.wait_for(lambda: self.failed or not self.busy, self.timeout_s)
            if self.failed:
                raise JobError("aborted: another edge failed")
            if not ready:
                raise JobError(self.what.format(step, self.timeout_s))
            self.busy = True

    def done(self, step: int) -> None:
        with self.cond:
            self.busy = False
            self.cond.notify_all()
