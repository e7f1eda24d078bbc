"""The transport interface: how the central reaches the edge objects.

Two implementations:

    rpc       torch.distributed.rpc under torchrun (transport.rpc): each edge object lives in its
              own process, created remotely and called through one trampoline; distributed
              autograd spans the cuts.
    loopback  the same edge objects in the central's process (transport.loopback), each served
              by its own threads, with the same bounded calls, the same byte accounting and
              ordinary autograd across the segments: a run on loopback is the same run.

Another transport (torch.distributed point-to-point, say) is one more class with these methods.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Callable, Mapping, Optional, Protocol

import torch


class Pending(Protocol):
    """A call on its way: its result, or its failure."""

    def wait(self) -> Any:
        """The result; raises the call's error (a timeout included)."""

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` on the thread that completes the call, if it fails."""


class FuturePending:
    """A Pending whose result a Future brings (from a thread of the transport's), bounded by
    ``timeout_s`` from when it was sent."""

    def __init__(self, fut: Future, timeout_s: float, name: str, method: str):
        self.fut, self.deadline, self.name, self.method = fut, time.monotonic() + timeout_s, name, method
        self.timeout_s = timeout_s

    def wait(self) -> Any:
        try:
            return self.fut.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(f"call {self.method} to {self.name} ran for more than {self.timeout_s:g} s") from None

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self.fut.add_done_callback(lambda done: done.exception() is not None and callback(done.exception()))


class Remote(Protocol):
    """One edge object, as the central reaches it."""

    def send(self, method: str, args: tuple, timeout_s: float, seq: Optional[int] = None) -> Pending:
        """Call ``method(*args)`` on the edge object (``Edge.serve``); ``seq`` numbers training calls."""


class Autograd(Protocol):
    """How a batch's backward spans the cuts (the autograd engine)."""

    def context(self) -> AbstractContextManager[int]: ...

    def backward(self, context_id: int, losses: list[torch.Tensor]) -> None: ...

    def gradients(self, context_id: int) -> Mapping[torch.Tensor, torch.Tensor]:
        """This process's parameters' gradients in the context (only this side's are asked for)."""


class Served(Protocol):
    """The object a transport serves for one edge (training.edge.Edge): every call enters by ``serve``."""
    name: str
    last_seen: float
    """time.monotonic() of the last call from the central: a silent central ends an edge process."""

    def serve(self, method: str, args: tuple, seq: Optional[int] = None) -> Any: ...

    def finish(self) -> None:
        """The job is done."""


Peers = Callable[[str], Callable[[], Any]]
"""Asks the named peer edge for its replica; returns the wait for it: edge to edge."""


class Host(Protocol):
    """What builds the edge objects a transport serves (training.hosting.EdgeHost): the composition
    of an edge is written once, on the training side, and no transport knows what it is made of."""

    def build(self, name: str, cfg: Any, peers: Peers, autograd: Autograd,
              guard: Callable[[], AbstractContextManager[None]] = ...) -> Served:
        """Edge ``name`` from the central's config ``cfg``; ``peers`` reach the other edges,
        ``autograd`` is the transport's, ``guard`` is held around each of its calls."""


class Transport(Protocol):
    name: str
    autograd: Autograd

    def members(self) -> list[str]:
        """The edges present, by number (edge1, edge2, ...)."""

    def admit(self, names: list[str]) -> list[str]:
        """Before anything of the job reaches them: the edges ``names`` that prove the job's secret
        (transport.admission; the same code for every transport), or raise when the job cannot go on
        without the others."""

    def connect(self, names: list[str], cfg: Any) -> list[Remote]:
        """Have each edge's ``Host`` build its edge object (from the central's config) and return a
        handle on each."""

    def where(self, name: str) -> str:
        """Where edge ``name`` runs, for the banner (its rank, or "in this process")."""

    def guard(self) -> AbstractContextManager[None]:
        """Held around the central's own compute: loopback's edges share the process's RNG and
        take turns with the central (a no-op for RPC, whose ranks are processes of their own)."""

    def finish(self, timeout_s: float) -> None:
        """The job is done: release the edges."""

    def shutdown(self, graceful: bool) -> None: ...
