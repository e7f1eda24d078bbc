"""The central's handle on its edges: one RRef and one link per edge, calls that are timed,
counted and watched for failure, fan-outs that keep at most one call in flight per edge, the
lanes (one central thread per edge) and the averaging of the edge replicas.

An RPC's time bound counts from the moment it is sent, waiting on the edge included, so no path
queues a second call on an edge before the first returns: the bound then covers a call's own work.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Optional

import torch
from torch.distributed import rpc

from . import edge
from .config import Config
from .failures import JobError
from .route import Hop, crossing
from .stage import average_states
from .wire import EdgeLink, Reply, Tally, WireFormat, nbytes

Tensor = torch.Tensor


class EdgeHandle:
    """The central's line to one edge: what the engines call to run the edge's hops."""

    def __init__(self, link: EdgeLink, rref: rpc.RRef, wire: WireFormat, timeout_s: float):
        self.link, self.rref, self.wire, self.timeout_s = link, rref, wire, timeout_s
        self.sent = 0  # training calls sent so far: the next one's number

    def call(self, fn: Callable, args: tuple, during: str = "") -> Any:
        """One call, its failure recorded the moment it happens (see EdgeLink.watch)."""
        return self._wait(self._send(fn, args, during), during)

    def _send(self, fn: Callable, args: tuple, during: str) -> torch.futures.Future:
        try:
            return self.link.watch(rpc.rpc_async(self.link.name, fn, args=(self.rref, *args), timeout=self.timeout_s),
                                   during)
        except Exception as exc:
            raise self.link.fail(exc, during) from exc

    def _wait(self, fut: torch.futures.Future, during: str) -> Any:
        try:
            return fut.wait()
        except Exception as exc:
            raise self.link.fail(exc, during) from exc

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
        during, seq = (" in evaluation", None) if evaluating else ("", self.sent)
        self.sent += not evaluating
        started = time.perf_counter()
        fut = self._send(edge.run, (packed, labels, lr, seq), during)

        def wait() -> Reply:
            reply: Reply = self._wait(fut, during)
            tally.received["labels"] += nbytes(reply.labels)
            if reply.output is not None:
                out = crossing(work[-1][0], "out")
                tally.count(tally.received, out, reply.output)
                reply = reply._replace(output=self.wire.decode(reply.output, out))
            if isinstance(reply.loss, Tensor):  # the autograd engine's loss, computed on the edge: a scalar
                tally.received["control"] += nbytes(reply.loss)
            self.link.call(time.perf_counter() - started, tally.sent, tally.received, tally.cuts)
            return reply

        return wait

    def run(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float,
            evaluating: bool = False) -> Reply:
        return self.submit(work, labels, lr, evaluating)()

    def step(self, context_id: int, lr: float) -> None:
        """Autograd engine: the edge steps its segments with the context's gradients."""
        self.call(edge.apply_step, (context_id, lr))


class Fleet:
    """Every edge of the job, each hosting one replica of the plan's edge segments."""

    def __init__(self, cfg: Config, names: list[str]):
        self.names = names
        self.own_weights = cfg.privacy.edge_weights == "edges"  # the edges keep their weights to themselves
        # The first calls also connect and build the segments: a loaded host may take a while.
        startup = cfg.rpc.startup_timeout_s
        rrefs = [rpc.remote(name, edge.EdgeHost, args=(cfg,), timeout=startup) for name in names]
        self.described = [f.wait() for f in [rpc.rpc_async(name, edge.describe, args=(r,), timeout=startup)
                                             for name, r in zip(names, rrefs)]]
        self.links = [EdgeLink(name, d["host"]) for name, d in zip(names, self.described)]
        wire = WireFormat(cfg.rpc.wire_types, graph=cfg.train.engine == "autograd")
        self.edges = [EdgeHandle(link, rref, wire, cfg.rpc.timeout_s) for link, rref in zip(self.links, rrefs)]
        self.timeout_s = cfg.rpc.timeout_s
        self.pool = ThreadPoolExecutor(len(names), thread_name_prefix="edge-lane")
        self.in_flight: list[Future] = []  # the lanes at work, one per edge

    def __len__(self) -> int:
        return len(self.edges)

    def lanes(self, work: Callable[[int, list], None], shares: list[list], on_failure: Callable[[], None] = None) -> None:
        """``work(k, shares[k])`` for every edge k at once, one thread each; the first failure
        ends them all and is raised (the report goes out now: torchrun stops the job about 0.1 s
        after a rank dies). ``on_failure`` releases the other lanes' waits."""
        futures = [self.pool.submit(self._guarded, work, k, share) for k, share in enumerate(shares) if share]
        self.in_flight = futures
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            if on_failure is not None:
                on_failure()
            raise min(failed, key=lambda e: e.when)  # _guarded raises JobErrors only

    def _guarded(self, work: Callable, k: int, share: list) -> None:
        try:
            work(k, share)
        except JobError:
            raise
        except Exception as exc:
            raise self.links[k].fail(exc) from exc

    def on_all(self, fn: Callable, per_edge_args: list[tuple], kind: str = "control",
               names: Optional[list[str]] = None) -> list[Any]:
        """``fn(rref, *per_edge_args[k])`` on every edge k (of ``names``, when given) at once, one
        call each; wait for all."""
        started = time.perf_counter()
        handles = self.edges if names is None else [self.edges[self.names.index(name)] for name in names]
        futures = [h.link.watch(rpc.rpc_async(h.link.name, fn, args=(h.rref, *args), timeout=self.timeout_s))
                   for h, args in zip(handles, per_edge_args)]
        results = []
        for h, args, fut in zip(handles, per_edge_args, futures):
            try:
                results.append(fut.wait())
            except Exception as exc:
                raise h.link.fail(exc) from exc
            h.link.call(time.perf_counter() - started, {kind: nbytes(args)}, {kind: nbytes(results[-1])})
        return results

    def sync(self, trained: set[str]) -> None:
        """Average the replicas that trained since the last sync (``trained``: edge names; an edge
        that has served its whole shard sits out the rest of the epoch and would only pull the
        average back) and push the average to every replica."""
        n = len(self.edges)
        if n == 1:
            return  # one replica is its own average
        if self.own_weights:  # the edges fetch each other's replicas: the central only says when
            peers = [name for name in self.names if name in trained] or self.names
            self.on_all(edge.gather_average, [(peers,)] * n)
            self.on_all(edge.apply_average, [()] * n)
            return
        states = self.on_all(edge.get_state, [()] * n, "edge_state")
        average = average_states([s for name, s in zip(self.names, states) if name in trained] or states)
        self.on_all(edge.set_state, [(average,)] * n, "edge_state")

    def state(self) -> dict[str, Tensor]:
        """The edge segments of the one synchronised model (after a sync any replica will do)."""
        started, handle = time.perf_counter(), self.edges[0]
        state = handle.call(edge.get_state, ())
        handle.link.call(time.perf_counter() - started, {}, {"edge_state": nbytes(state)})
        return state

    def export(self, step: int, job: str) -> dict[str, Any]:
        """Every edge's checkpoint part by edge name; with edge-held weights, each edge writes its
        part to its own disk and only its size and SHA-256 come back."""
        if self.own_weights:
            return dict(zip(self.names, self.on_all(edge.save_part, [(step, job)] * len(self.edges))))
        return dict(zip(self.names, self.on_all(edge.export_state, [()] * len(self.edges), "edge_state")))

    def restore(self, parts: dict[str, Any], names: list[str]) -> None:
        """Put the edges ``names`` back from their checkpoint parts (by edge name)."""
        self.on_all(edge.import_state, [(parts[name],) for name in names], "edge_state", names)

    def restore_own(self, step: int, written: dict[str, Any], names: list[str]) -> None:
        """The edges ``names`` back from the parts they wrote to their own disks for ``step``
        (``written``: each part's size and SHA-256, as the central's checkpoint records them)."""
        self.on_all(edge.load_part, [(step, written[name]) for name in names], "control", names)

    def adopt(self, newcomers: list[str], known: list[str], states: Optional[list[dict[str, Tensor]]]) -> None:
        """Edges a checkpoint does not know take the average of its edges' weights (``states``), or,
        when those stay on the edges, the average the ``known`` edges hold; their optimizers start
        fresh."""
        if states is not None:
            average = average_states(states)
            self.on_all(edge.set_state, [(average,)] * len(newcomers), "edge_state", newcomers)
            return
        self.on_all(edge.gather_average, [(known,)] * len(newcomers), "control", newcomers)
        self.on_all(edge.apply_average, [()] * len(newcomers), "control", newcomers)

    def memory_bytes(self) -> list[int]:
        return self.on_all(edge.rss, [()] * len(self.edges))

    def finish(self) -> None:
        for name in self.names:
            rpc.rpc_sync(name, edge.finish, timeout=self.timeout_s)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Membership:
    """The edges present in this attempt against those of the attempt before (``before``: None in
    a run's first): what the banner and metrics.jsonl record of every change."""

    def __init__(self, before: Optional[list[str]], now: list[str], step: int, averaged: list[str]):
        self.before, self.now, self.step, self.averaged = before, now, step, averaged  # averaged: see state.restore
        self.left = [name for name in before or [] if name not in now]
        self.joined = [name for name in now if before is not None and name not in before]

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "edges": self.now, "left": self.left, "joined": self.joined}

    def describe(self, cfg: Config) -> Optional[str]:
        """The banner's line: None for a fixed fleet that did not change."""
        most = cfg.topology.edges
        elastic = cfg.topology.fewest < most
        if not (elastic or self.left or self.joined or self.averaged):
            return None
        text = f"{len(self.now)} of {cfg.topology.fewest}..{most} edges present" if elastic else \
            f"{len(self.now)} edges present"
        changes = [f"{', '.join(names)} {what}" for names, what in ((self.left, "left"), (self.joined, "joined"))
                   if names]
        if changes:
            text += f"; {' and '.join(changes)} at step {self.step} (was {', '.join(self.before)})"
        if self.averaged:
            text += f"; {', '.join(self.averaged)} from the average of the checkpoint's edge weights, optimizer fresh"
        absent = [f"edge{k}" for k in range(1, most + 1) if f"edge{k}" not in self.now]
        if absent and cfg.data.placement == "edge":
            text += f"; {', '.join(absent)}'s data is not trained on while away"
        return text
