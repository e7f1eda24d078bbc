"""Failures on purpose, at exact points of a run, for testing what survives what.

    SPLIT_TRAINER_FAULT="edge2:sync:1:kill, central:train:30:kill:1"

Each comma-separated entry is ``who:point:n:action[:attempt]``: the rank named ``who`` (central,
edge1, ...) does ``action`` the ``n``-th time it reaches ``point`` in torchrun attempt ``attempt``
(default 0, the first). Points: ``train`` (an edge's training call, or the end of a batch's turn
on the central), ``eval`` (an edge's evaluation call), ``sync`` (an edge handing its replica for
averaging), ``export`` (an edge handing its checkpoint part), ``checkpoint`` (the central about
to write a checkpoint file), ``flush`` (a live loopback fleet's edge, each time the central looks
for edges that dialled in: at every flush). Actions: ``kill`` (SIGKILL), ``stop`` (SIGSTOP: a
hang), ``kill_soon`` (SIGKILL 50 ms later, after the current call has replied), ``enospc`` (the
write fails: no space), ``slow`` (from then on, every time: SPLIT_TRAINER_SLOW_MS more, default
100 ms, about twice an edge's own work on a batch), ``nan`` (the caller poisons what it computes:
an edge's weights turn NaN), ``leave`` (a live loopback fleet's edge: its stream ends with the
call, which fails as a lost connection's), ``join`` (at ``flush``: an edge that left dials in
again, a fresh edge object as a restarted process would be). ``leave`` and ``join`` make the
membership events of a live fleet happen at fixed steps (docs/elastic.md#a-live-fleet). A process
that hosts several names (loopback: the central and every edge) arms them all. Unset, every hook
is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import Counter
from typing import Iterable, Optional

from split_trainer.core.errors import ConfigError

POINTS = ("train", "eval", "sync", "export", "checkpoint", "flush")
ACTIONS = ("kill", "stop", "kill_soon", "enospc", "slow", "nan", "leave", "join")
SLOW_S = float(os.environ.get("SPLIT_TRAINER_SLOW_MS", "100")) / 1000
_armed: dict[tuple[str, str], tuple[int, str]] = {}  # (who, point) -> (n, action) in this process and attempt
_seen: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()


def arm(names: Iterable[str], attempt: int) -> None:
    """Read SPLIT_TRAINER_FAULT and keep the entries meant for the ``names`` this process hosts in
    this attempt (a central that resumes in its own process, ``serve``, arms each attempt afresh)."""
    _armed.clear()
    _seen.clear()
    for entry in filter(None, (e.strip() for e in os.environ.get("SPLIT_TRAINER_FAULT", "").split(","))):
        parts = entry.split(":")
        if len(parts) not in (4, 5) or parts[1] not in POINTS or parts[3] not in ACTIONS or not parts[2].isdigit():
            raise ConfigError(f"SPLIT_TRAINER_FAULT entry {entry!r} must look like who:point:n:action[:attempt] "
                              f"(points: {', '.join(POINTS)}; actions: {', '.join(ACTIONS)})")
        if parts[0] in names and int(parts[4] if len(parts) == 5 else 0) == attempt:
            _armed[parts[0], parts[1]] = (int(parts[2]), parts[3])


def hit(point: str, who: Optional[str] = None) -> Optional[str]:
    """Called where ``point`` is reached by ``who`` (None: whichever name is armed there); does the
    armed action when its count comes up, and returns it (the caller does ``nan``)."""
    if not _armed:
        return None
    key = next((k for k in _armed if k[1] == point and who in (None, k[0])), None)
    if key is None:
        return None
    with _lock:
        _seen[key] += 1
        count = _seen[key]
    n, action = _armed[key]
    if action == "slow" and count >= n:
        time.sleep(SLOW_S)  # a slower machine: the work itself, not a wait for anything
        return action
    if count != n:
        return None
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action == "kill_soon":
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
    elif action in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
    return action
