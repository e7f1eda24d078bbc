"""The central's handle on its edges: one RRef and one link per edge, calls that are timed,
counted and watched for failure, and fan-outs that keep at most one call in flight per edge.

An RPC's time bound counts from the moment it is sent, waiting on the edge included, so no path
queues a second call on an edge before the first returns: the bound then covers a call's own work.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Optional

import torch
from torch.distributed import rpc

from . import edge
from .config import Config
from .models import average_states
from .schedule import Hop, from_wire, to_wire
from .wire import EdgeLink, nbytes

Tensor = torch.Tensor


class EdgeHandle:
    """The central's line to one edge: what ``Schedule`` calls to run the edge's hops."""

    def __init__(self, link: EdgeLink, rref: rpc.RRef, wire: torch.dtype, timeout_s: float):
        self.link, self.rref, self.wire, self.timeout_s = link, rref, wire, timeout_s

    def call(self, fn: Callable, args: tuple, during: str = "") -> Any:
        """One call, its failure recorded the moment it happens (see EdgeLink.watch)."""
        try:
            fut = rpc.rpc_async(self.link.name, fn, args=(self.rref, *args), timeout=self.timeout_s)
            return self.link.watch(fut, during).wait()
        except Exception as exc:
            raise self.link.fail(exc, during) from exc

    def run(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float,
            evaluating: bool = False) -> tuple[Optional[Tensor], Any]:
        """The edge runs ``work`` ((hop, input) pairs); what crosses a cut travels as the wire type.
        Every tensor is counted by what it is: inputs, labels, activations, activation gradients
        (``eval`` for evaluation's activations and inputs), and per cut."""
        sent, cuts, packed = Counter(), Counter(), []
        for hop, tensor in work:
            kind, cut = hop.arrives()
            if cut is not None and tensor is not None:
                tensor = to_wire(tensor, self.wire)
                if not evaluating:
                    cuts[(cut, "forward" if kind == "activations" else "backward")] += nbytes(tensor)
            sent["eval" if evaluating else kind] += nbytes(tensor)
            packed.append((hop, tensor))
        sent["labels"] += nbytes(labels)
        started = time.perf_counter()
        out, stat = self.call(edge.run, (packed, labels, lr), " in evaluation" if evaluating else "")
        received = Counter({"labels": nbytes(stat) if isinstance(stat, Tensor) else 0})
        leaves = work[-1][0].leaves() if out is not None else None
        if leaves is not None:
            kind, cut = leaves
            received["eval" if evaluating else kind] += nbytes(out)
            if not evaluating:
                cuts[(cut, "forward" if kind == "activations" else "backward")] += nbytes(out)
            out = from_wire(out)
        elif out is not None:  # the autograd engine's loss, computed on the edge: a scalar
            received["control"] += nbytes(out)
        self.link.call(time.perf_counter() - started, sent, received, cuts)
        return out, stat

    def step(self, context_id: int, lr: float) -> None:
        """Autograd engine: the edge steps its segments with the context's gradients."""
        self.call(edge.apply_step, (context_id, lr))


class Fleet:
    """Every edge of the job, each hosting one replica of the plan's edge segments."""

    def __init__(self, cfg: Config, names: list[str], initial: dict[str, Tensor]):
        self.names = names
        # Every replica starts from the central's seeded weights: one model, N copies.
        # The first calls also connect and build the segments: a loaded host may take a while.
        startup = cfg.rpc.startup_timeout_s
        rrefs = [rpc.remote(name, edge.EdgeHost, args=(cfg, initial), timeout=startup) for name in names]
        self.described = [f.wait() for f in [rpc.rpc_async(name, edge.describe, args=(r,), timeout=startup)
                                             for name, r in zip(names, rrefs)]]
        self.links = [EdgeLink(name, d["host"]) for name, d in zip(names, self.described)]
        wire = getattr(torch, cfg.rpc.activation_dtype)
        self.edges = [EdgeHandle(link, rref, wire, cfg.rpc.timeout_s) for link, rref in zip(self.links, rrefs)]
        self.timeout_s = cfg.rpc.timeout_s

    @property
    def shards(self) -> Optional[list[dict[str, Any]]]:
        """Edge placement: every edge's shard sizes and label counts (edge.describe)."""
        return [d["shard"] for d in self.described] if self.described[0]["shard"] else None

    def __len__(self) -> int:
        return len(self.edges)

    def on_all(self, fn: Callable, per_edge_args: list[tuple], kind: str = "control") -> list[Any]:
        """``fn(rref, *per_edge_args[k])`` on every edge k at once, one call each; wait for all."""
        started = time.perf_counter()
        futures = [h.link.watch(rpc.rpc_async(h.link.name, fn, args=(h.rref, *args), timeout=self.timeout_s))
                   for h, args in zip(self.edges, per_edge_args)]
        results = []
        for h, args, fut in zip(self.edges, per_edge_args, futures):
            try:
                results.append(fut.wait())
            except Exception as exc:
                raise h.link.fail(exc) from exc
            h.link.call(time.perf_counter() - started, {kind: nbytes(args)}, {kind: nbytes(results[-1])})
        return results

    def sync(self, trained: set[int]) -> None:
        """Average the replicas that trained since the last sync (``trained``: edge indices; an edge
        that has served its whole shard sits out the rest of the epoch and would only pull the
        average back) and push the average to every replica."""
        if len(self.edges) == 1:
            return  # one replica is its own average
        states = self.on_all(edge.get_state, [()] * len(self.edges))
        average = average_states([s for k, s in enumerate(states) if k in trained] or states)
        self.on_all(edge.set_state, [(average,)] * len(self.edges))

    def state(self) -> dict[str, Tensor]:
        """The edge segments of the one synchronised model (after a sync any replica will do)."""
        return self.edges[0].call(edge.get_state, ())

    def export(self) -> dict[str, Any]:
        """Every edge's checkpoint part, by edge name."""
        return dict(zip(self.names, self.on_all(edge.export_state, [()] * len(self.edges))))

    def restore(self, parts: dict[str, Any]) -> None:
        self.on_all(edge.import_state, [(parts[name],) for name in self.names])

    def memory_bytes(self) -> list[int]:
        return self.on_all(edge.rss, [()] * len(self.edges))

    def finish(self) -> None:
        for name in self.names:
            rpc.rpc_sync(name, edge.finish, timeout=self.timeout_s)
