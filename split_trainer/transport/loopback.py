"""The loopback transport: every edge object in the central's own process, each served by threads
of its own, with the same bounded calls and the same byte accounting as RPC, and ordinary autograd
across the segments. A run on loopback is the same run as on RPC (docs/how-it-works.md says where
it cannot be bit for bit); it needs no torchrun:

    python -m split_trainer --config configs/mnist.yaml --set topology.transport=loopback

so a whole run fits in a debugger, a notebook or a test.

Each edge keeps its own RNG stream, as its own process would: the process's RNG is swapped to the
edge's while the edge computes, and the central's compute and the edges' take turns (``guard``),
so dropout and the privacy defences draw what they would draw on RPC.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from split_trainer.config import Config
from split_trainer.core import faults
from split_trainer.core.errors import say
from split_trainer.transport import admission
from split_trainer.transport.base import FuturePending, Host, Served
from split_trainer.transport.topology import edge_number


class LocalAutograd:
    """The autograd engine's contexts in one process: the forward graphs cross the cuts as they are,
    one backward reaches every segment, and each side steps from its parameters' ``.grad`` (each
    edge's parameters are its own, and the central's are stepped inside its turn)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    @contextmanager
    def context(self) -> Iterator[int]:
        yield next(self._ids)

    def backward(self, context_id: int, losses: list[torch.Tensor]) -> None:
        torch.autograd.backward(losses)

    def gradients(self, context_id: int) -> "_Grads":
        return _Grads()


class _Grads:
    """Each parameter's gradient, as ``optim.step_with`` asks for it."""

    @staticmethod
    def get(param: torch.Tensor) -> Optional[torch.Tensor]:
        return param.grad


class _Now:
    """A call made at once, on this thread (admission comes before an edge has threads of its own)."""

    def __init__(self, call: Callable[..., Any], *args: Any):
        try:
            self.value, self.error = call(*args), None
        except Exception as exc:
            self.value, self.error = None, exc

    def wait(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class LoopbackRemote:
    """One edge object, reached over the stream (a number) it was built on, as over grpc: an edge
    that left and joined again is another object (training.live)."""

    def __init__(self, transport: "LoopbackTransport", name: str, stream: int):
        self.transport, self.name, self.stream = transport, name, stream

    def send(self, method: str, args: tuple, timeout_s: float, seq: Optional[int] = None) -> FuturePending:
        return FuturePending(self.transport.submit(self.name, self.stream, method, args, seq), timeout_s, self.name,
                             method)

    def attached(self) -> bool:
        return self.transport.stream_of(self.name) == self.stream

    @property
    def edge(self) -> Served:
        """The edge object itself (in this process: for a debugger, a notebook or a test)."""
        return self.transport.edge(self.name)


class LoopbackTransport:
    name = "loopback"

    def __init__(self, cfg: Config, host: Host, edge_secrets: Optional[Mapping[str, Optional[str]]] = None):
        self.cfg, self.host = cfg, host  # host: every edge of this process (training.hosting.EdgeHost)
        self.autograd = LocalAutograd()
        self.key = admission.job_key(cfg.output.run_dir)
        # The edges here share this process's secret; ``edge_secrets`` gives an edge another (or
        # none, as None), so that one process can hold a host that does not belong (the tests).
        self._keys = {name: None if secret is None else secret.encode()
                      for name, secret in (edge_secrets or {}).items()}
        self._baton = threading.RLock()  # the central's compute and the edges' take turns
        self._edges: dict[str, Served] = {}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        # A live fleet's membership (training.live): each edge object's stream, while it is up, and
        # the edges that left and "dialled in" again (SPLIT_TRAINER_FAULT's leave and join, core.faults).
        self._numbers, self._streams = itertools.count(1), {}
        self._dialled: set[str] = set()

    def start(self) -> None:
        pass

    def members(self) -> list[str]:
        return [f"edge{k}" for k in range(1, self.cfg.topology.edges + 1)]

    def admit(self, names: list[str]) -> list[str]:
        sides = {name: admission.EdgeSide(name, self._keys.get(name, self.key)) for name in names}
        door = admission.Door(ask=lambda name, nonce: _Now(sides[name].prove, nonce),
                              tell=lambda name, verdict: _Now(self._hear, sides[name], verdict),
                              where=self.where, sheds=True)
        return admission.admit(names, door, self.key, self.cfg.topology)

    @staticmethod
    def _hear(side: admission.EdgeSide, verdict: admission.Verdict) -> Optional[str]:
        answer = side.hear(verdict)
        if side.out is not None:  # the line the edge's own process would print as it leaves
            say(f"split_trainer: [{side.name}] error: {side.out}")
        return answer

    def connect(self, names: list[str], cfg: Config) -> list[LoopbackRemote]:
        """Build each edge object afresh, as an edge process that (re)started would."""
        for name in names:
            # The stream an edge process would have seeded for itself (transport.rpc.serve_edge).
            rng = [torch.Generator().manual_seed(cfg.train.seed + edge_number(name)).get_state()]
            self._edges[name] = self.host.build(name, cfg, self._ask_peer, self.autograd, self._edge_guard(rng))
            if name in self._pools:  # the threads of the object it was before it left
                self._pools[name].shutdown(wait=False, cancel_futures=True)
            # As many threads as an RPC agent has: a call waiting on a peer must not block the peer's reply.
            self._pools[name] = ThreadPoolExecutor(cfg.rpc.num_worker_threads, thread_name_prefix=name)
            self._dialled.discard(name)
            self._streams[name] = next(self._numbers)
        return [LoopbackRemote(self, name, self._streams[name]) for name in names]

    def submit(self, name: str, stream: int, method: str, args: tuple, seq: Optional[int]) -> Future:
        """Call ``method`` on the edge object of ``stream``; a stream that ended fails the call as
        a lost connection would."""
        if self.stream_of(name) != stream:
            failed: Future = Future()
            failed.set_exception(ConnectionError(f"{name}'s stream to the central ended"))
            return failed
        return self._pools[name].submit(self._serve, name, stream, method, args, seq)

    def _serve(self, name: str, stream: int, method: str, args: tuple, seq: Optional[int]) -> Any:
        try:
            return self._edges[name].serve(method, args, seq)
        except ConnectionError:  # the edge left (a fault on purpose): its stream ends with the call
            self.drop(name, "it left", stream)
            raise

    def edge(self, name: str) -> Served:
        return self._edges[name]

    def stream_of(self, name: str) -> Optional[int]:
        return self._streams.get(name)

    def drop(self, name: str, why: str, stream: int) -> None:
        """End edge ``name``'s stream number ``stream``: its calls fail from now on."""
        if self._streams.get(name) == stream:
            del self._streams[name]

    def arrivals(self, known: list[str], need: int, timeout_s: float) -> list[str]:
        """The edges not in ``known`` that dialled in: on loopback, those SPLIT_TRAINER_FAULT has
        join at this look (core.faults' point ``flush``). Nothing else dials in, so nothing is waited for."""
        for name in self.members():
            if faults.hit("flush", name) == "join" and name not in self._streams:
                self._dialled.add(name)
        return [name for name in self.members() if name not in known and (name in self._dialled or name in self._streams)]

    def _ask_peer(self, name: str) -> Callable[[], dict[str, torch.Tensor]]:
        return LoopbackRemote(self, name, self._streams.get(name, 0)).send("peer_state", (), self.cfg.rpc.timeout_s).wait

    def _edge_guard(self, rng: list[torch.Tensor]) -> Callable[[], AbstractContextManager[None]]:
        @contextmanager
        def guard() -> Iterator[None]:
            with self._baton:
                outer = torch.get_rng_state()
                torch.set_rng_state(rng[0])
                try:
                    yield
                finally:
                    rng[0] = torch.get_rng_state()
                    torch.set_rng_state(outer)
        return guard

    def where(self, name: str) -> str:
        return "in this process"

    def guard(self) -> AbstractContextManager[None]:
        return self._baton

    def finish(self, timeout_s: float) -> None:
        for edge in self._edges.values():
            edge.finish()

    def shutdown(self, graceful: bool) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=graceful, cancel_futures=True)
