"""The RPC transport: torch.distributed.rpc under torchrun, one process per rank.

The central creates each edge object on its edge with ``rpc.remote`` and calls it through one
trampoline, ``_call_method`` (as pytorch/examples' RPC pipeline does): the edge object's ``serve``
takes its lock in one place. Distributed autograd spans the cuts for the autograd engine; with
edge-held weights the edges fetch each other's replicas edge to edge. Tensors travel on the CPU
(RRefs and distributed autograd take no CUDA tensors). Before any of that, an edge proves that
it holds the job's secret (transport.admission: ``_prove`` and ``_hear`` are its half here).
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed.autograd as dist_autograd
from torch.distributed import rpc

from split_trainer.config import Config
from split_trainer.core.errors import EdgeRefusal, printable, say
from split_trainer.transport import admission
from split_trainer.transport.base import Host, Served
from split_trainer.transport.topology import ROLE, Topology, edge_number, init_rpc, members

# An edge process serves one edge object; RPC reaches module functions by name, so what they
# need lives here: the object (for its peers), what builds it (its data loaded before RPC came
# up, its own config), and the end.
_served: list[Optional[Served]] = [None]
_host: list[Optional[Host]] = [None]
_finished = threading.Event()
_refused = threading.Event()  # this edge's own policy refused the central's job (training.policy)
_edge_side: list[Optional[admission.EdgeSide]] = [None]  # this edge's half of admission


class DistAutograd:
    """Distributed autograd: a context per batch spans every cut; each side reads its own gradients."""

    def context(self) -> AbstractContextManager[int]:
        return dist_autograd.context()

    def backward(self, context_id: int, losses: list[torch.Tensor]) -> None:
        dist_autograd.backward(context_id, losses)

    def gradients(self, context_id: int) -> dict[torch.Tensor, torch.Tensor]:
        return dist_autograd.get_gradients(context_id)


class _Pending:
    def __init__(self, fut: torch.futures.Future):
        self.fut = fut

    def wait(self) -> Any:
        try:
            value = self.fut.wait()
        except Exception as exc:
            raise _edge_words(exc) from None
        if isinstance(value, _Refusal):
            raise EdgeRefusal(printable(value.line, 800))  # a peer's words
        return value

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        def note(done: torch.futures.Future) -> None:
            try:
                done.value()
            except Exception as exc:
                callback(_edge_words(exc))
        self.fut.add_done_callback(note)


_REPR = re.compile(r"""^\w+\((['"])(.*)\1\)$""")


def _edge_words(exc: Exception) -> Exception:
    """An edge's error as the edge said it. torch RPC brings it back as "On WorkerInfo(...):", then
    its repr, then the edge's traceback (behind "Type: " when an RRef's creation failed): the one
    line a person reads would otherwise be the first."""
    lines = str(exc).splitlines()
    for at, line in enumerate(lines[:-1]):
        found = _REPR.match(lines[at + 1].strip()) if "On WorkerInfo(" in line else None
        if found:
            words = printable(found.group(2), 800)  # a peer's
            try:
                return type(exc)(words)
            except Exception:  # a type that takes other arguments
                return RuntimeError(words)
    return exc


class RpcRemote:
    def __init__(self, name: str, rref: rpc.RRef):
        self.name, self.rref = name, rref

    def send(self, method: str, args: tuple, timeout_s: float, seq: Optional[int] = None) -> _Pending:
        try:  # a call on an edge object whose creation failed fails here, with that failure
            return _Pending(rpc.rpc_async(self.name, _call_method, args=(self.rref, method, args, seq),
                                          timeout=timeout_s))
        except Exception as exc:
            raise _edge_words(exc) from None


@dataclass(frozen=True)
class _Refusal:
    """An edge's refusal (training.policy) as the value of its call: torch RPC prints the traceback
    of every exception a remote function raises, and a refusal is one line, not a crash. The
    central's ``_Pending`` raises it as an EdgeRefusal."""
    line: str


def _call_method(rref: rpc.RRef, method: str, args: tuple, seq: Optional[int]) -> Any:
    """The trampoline: every call the central makes of an edge object lands here, on the edge."""
    edge = rref.local_value()
    if isinstance(edge, _Refusal):  # the edge refused the job as it was built: every call hears it again
        return edge
    try:
        return edge.serve(method, args, seq)
    except EdgeRefusal as exc:
        return _Refusal(str(exc))


def _build_edge(cfg: Config) -> Served | _Refusal:
    """On the edge, at the central's ``rpc.remote``: this edge's object, built by this process's
    host (its own config, the data it loaded) from the central's config, under its name in the group;
    an edge holding the job's secret builds nothing for a central that has not proved it."""
    _edge_side[0].serves()
    try:
        _served[0] = _host[0].build(rpc.get_worker_info().name, cfg, partial(_ask_peer, timeout_s=cfg.rpc.timeout_s),
                                    DistAutograd())
    except EdgeRefusal as exc:  # this edge's own policy refuses the job: the central hears why, and the edge leaves
        _refused.set()
        _finished.set()
        return _Refusal(str(exc))
    return _served[0]


def _alive() -> None:
    pass


def _outlive_the_central(timeout_s: float) -> None:
    """This edge refused the job (its line is out, and the refusal is the answer the central gets):
    wait until the central, which stops on a refusal, is gone (a call to it fails), at most
    ``timeout_s``, then leave with exit 2. Leaving at once could beat the answer to the central;
    waiting for a job that will never come would hold the edge for rpc.startup_timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rpc.rpc_sync("central", _alive, timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            break
        time.sleep(0.2)  # a poll of the central's liveness, bounded by the deadline
    os._exit(2)


def _peer_state() -> dict[str, torch.Tensor]:
    return _served[0].serve("peer_state", ())


def _ask_peer(name: str, timeout_s: float) -> Callable[[], dict[str, torch.Tensor]]:
    return rpc.rpc_async(name, _peer_state, timeout=timeout_s).wait


def _finish() -> None:
    _finished.set()


def _prove(nonce: bytes) -> admission.Proof:
    """On the edge: the central's challenge, its first call here (transport.admission)."""
    return _edge_side[0].prove(nonce)


def _hear(verdict: admission.Verdict, timeout_s: float) -> Optional[str]:
    """On the edge: the central's verdict. An edge that must leave wakes its main thread and
    answers once that thread has stopped its host (EdgeSide.leave): the central may end the round
    as soon as it has the answer, and this host must not be restarted into the next one."""
    side = _edge_side[0]
    answer = side.hear(verdict)
    if side.out is not None:
        _finished.set()
        side.left.wait(timeout_s)
    return answer


class RpcTransport:
    """The central's side of the RPC transport."""
    name = "rpc"

    def __init__(self, topo: Topology, cfg: Config):
        self.topo, self.cfg = topo, cfg
        self.autograd = DistAutograd()
        self.key = admission.job_key(cfg.output.run_dir)  # a bad secret stops the central here, before RPC

    def start(self) -> None:
        init_rpc(self.topo, self.cfg)

    def members(self) -> list[str]:
        return members()

    def admit(self, names: list[str]) -> list[str]:
        # These are the first calls to each edge: they also connect, as connect's do.
        timeout, wait_s = self.cfg.rpc.startup_timeout_s, self.cfg.rpc.timeout_s
        door = admission.Door(
            ask=lambda name, nonce: rpc.rpc_async(name, _prove, args=(nonce,), timeout=timeout),
            tell=lambda name, verdict: rpc.rpc_async(name, _hear, args=(verdict, wait_s), timeout=timeout),
            where=self.where, sheds=False)
        return admission.admit(names, door, self.key, self.cfg.topology)

    def connect(self, names: list[str], cfg: Config) -> list[RpcRemote]:
        # The first calls also connect and build the segments: a loaded host may take a while.
        rrefs = [rpc.remote(name, _build_edge, args=(cfg,), timeout=cfg.rpc.startup_timeout_s) for name in names]
        return [RpcRemote(name, rref) for name, rref in zip(names, rrefs)]

    def where(self, name: str) -> str:
        return f"rank {rpc.get_worker_info(name).id}"

    def guard(self) -> AbstractContextManager[None]:
        return nullcontext()

    def finish(self, timeout_s: float) -> None:
        for name in self.members():
            rpc.rpc_sync(name, _finish, timeout=timeout_s)

    def shutdown(self, graceful: bool) -> None:
        rpc.shutdown(graceful=graceful)


def serve_edge(topo: Topology, cfg: Config, host: Callable[[], Host]) -> None:
    """An edge rank: serve the central's calls until it says the job is done; give up if it falls
    silent. ``host()`` loads this edge's data (training.hosting.EdgeHost), before RPC comes up."""
    torch.manual_seed(cfg.train.seed + edge_number(topo.name))
    # An edge prints only warnings and errors, each on one line under its own name.
    warnings.showwarning = lambda message, category, *_args, **_kw: say(
        f"split_trainer: [{topo.name}] warning: {category.__name__}: {message}")
    _host[0] = host()  # a missing data folder fails here, before RPC
    # The secret is read before RPC comes up (a bad one is one line, exit 2); an edge host of an
    # elastic fleet (launch/edge.sh) runs only edges, so a refused one stops its own agent.
    _edge_side[0] = admission.EdgeSide(topo.name, admission.job_key(cfg.output.run_dir), os.environ.get(ROLE) == "edge")
    init_rpc(topo, cfg)
    started = time.monotonic()
    poll = min(5.0, cfg.rpc.timeout_s)
    while not _finished.wait(poll):
        # Until the central builds this edge, it is starting up (admission, its own segments, its
        # data): a wait the central bounds by rpc.startup_timeout_s, so the edge does too.
        key, limit, since = (("rpc.timeout_s", cfg.rpc.timeout_s, _served[0].last_seen) if _served[0] else
                             ("rpc.startup_timeout_s", cfg.rpc.startup_timeout_s, started))
        silent = time.monotonic() - since
        if silent > limit:
            raise TimeoutError(f"no call from the central for {silent:.0f} s ({key}={limit:g})")
    if _refused.is_set():
        _outlive_the_central(cfg.rpc.timeout_s)
    _edge_side[0].leave()  # refused (or the job stopped): one line, exit 2
    rpc.shutdown(graceful=True)
