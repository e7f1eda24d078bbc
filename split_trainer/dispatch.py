"""Which edge takes which batch of a chunk, and in which order batches take the central's turn
(``train.dispatch``).

    round_robin  batch i to edge i mod N (edge placement: the shards' rotation); turns in step
                 order. A run is a function of its seed and config.
    free_first   the next batch to whichever edge asks first (an edge asks when its previous batch
                 has had its turn); the turn to whichever batch is ready first. A slow edge takes
                 fewer batches and holds no one's turn; which edge trains which batch, and the turn
                 order, follow the timing, so runs are not bit-reproducible.

Either way a batch is *taken* (``Placement.take``) in the lane of the edge that runs it, in that
lane's order: an edge-held batch is drawn from that edge's own shard only then.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterable, Iterator

from .engines import FirstCome, Turns
from .placement import Batch

Take = Callable[[Batch], Batch]


def shares(mode: str, chunk: list[Batch], edges: int, take: Take) -> list[Iterable[Batch]]:
    """Per edge, the batches its lane runs (an empty list: none)."""
    if mode == "round_robin":
        fixed = [[b for b in chunk if b.edge == k] for k in range(edges)]
        return [map(take, share) if share else [] for share in fixed]
    queue, lock = deque(chunk), threading.Lock()

    def lane(k: int) -> Iterator[Batch]:
        while True:
            with lock:
                if not queue:
                    return
                batch = queue.popleft()
            batch.edge = k
            yield take(batch)

    return [lane(k) for k in range(edges)]


def turns(mode: str, first_step: int, timeout_s: float) -> Turns:
    return Turns(first_step, timeout_s) if mode == "round_robin" else FirstCome(timeout_s)
