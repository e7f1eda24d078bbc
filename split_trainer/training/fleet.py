"""The central's fleet: one link per edge (transport.link) and the operations over all of them,
each written once: work on every edge at once (one driver thread per edge), calls on every edge
at once, the averaging of the edge replicas, checkpoint parts, memory probes.

An RPC's time bound counts from the moment it is sent, waiting on the edge included, so no path
queues a second call on an edge before the first returns (except training with train.in_flight
above 1, whose calls the edge runs in the order they were sent): the bound then covers a call's
own work.
"""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from split_trainer.config import Config
from split_trainer.core.errors import JobError, printable
from split_trainer.core.tensors import average_states, poisoned
from split_trainer.transport.base import Transport
from split_trainer.transport.link import Link, LinkSnapshot
from split_trainer.transport.wire import WireFormat

Tensor = torch.Tensor


class Fleet:
    """Every edge of the job, each hosting one replica of the plan's edge segments."""

    def __init__(self, cfg: Config, transport: Transport, names: list[str], replicas: bool = True):
        names = transport.admit(names)  # nothing of the job reaches an edge before it proves the job's secret
        self.names, self.transport = names, transport
        self.own_weights = cfg.privacy.edge_weights == "edges"  # the edges keep their weights to themselves
        self.replicas = replicas  # False: each edge runs a segment of its own (its placement's driver says)
        self.timeout_s = cfg.rpc.timeout_s
        self.wire = WireFormat(cfg.rpc.wire_types, graph=cfg.train.engine == "autograd")
        self.links = [Link(name, remote, self.wire, cfg.rpc.timeout_s)
                      for name, remote in zip(names, transport.connect(names, cfg))]
        # The first calls also connect and build the segments: a loaded host may take a while.
        self.reports = self.on_all("about", timeout=cfg.rpc.startup_timeout_s)  # training.edge.Edge.about
        for link, report in zip(self.links, self.reports):
            link.host = printable(report["host"])  # a peer's word, printed in the banner and in errors
        self.pool = ThreadPoolExecutor(cfg.topology.edges, thread_name_prefix="edge-driver")  # the most edges
        self.average: Optional[dict[str, Tensor]] = None  # the last sync's, where the central holds the weights
        self.in_flight: list[Future] = []  # the driver threads at work, one per edge
        # Set by the central for a live fleet (training.live): what a newcomer's placement needs
        # (the driver's welcome), where a change mid-span is recorded, and the newest checkpoint.
        self.welcome: Callable[[Link], None] = lambda link: None
        self.changed: Callable[[Membership], None] = lambda change: None
        self.newest: Optional[Path] = None
        self.departed: list[LinkSnapshot] = []  # the last word of each link a live fleet let go

    def __len__(self) -> int:
        return len(self.links)

    def snapshots(self) -> list[LinkSnapshot]:
        return [link.snapshot() for link in self.links]

    def all_snapshots(self) -> list[LinkSnapshot]:
        """Every link the run has had, those of edges that left a live fleet included: its bytes."""
        return self.departed + self.snapshots()

    def per_edge(self, work: Callable[[int, list], None], shares: list[list],
                 on_failure: Optional[Callable[[], None]] = None,
                 give_back: Optional[Callable[[int], int]] = None) -> None:
        """``work(k, shares[k])`` for every edge k at once, one thread each; the first failure
        ends them all and is raised (the report goes out now: torchrun stops the job about 0.1 s
        after a rank dies). ``on_failure`` releases the other threads' waits; ``give_back(k)``
        puts edge k's unfinished batches back, where an edge may leave (training.live)."""
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

    def takers(self, wanted: list[int]) -> list[int]:
        """The edges of ``wanted`` that can take batches now (a live fleet's present ones)."""
        return wanted

    def refresh(self, step: int) -> Optional["Membership"]:
        """At a flush: the edges that left and joined since the last one (a live fleet's; None
        when nothing changed, and always for a fixed fleet)."""
        return None

    def lost(self, exc: JobError) -> JobError:
        """``exc``, as a live fleet's Left where an edge went away (training.live)."""
        return exc

    def pause(self, exc: JobError, step: int) -> None:
        """Mid-span, a call of a fleet whose every edge takes every batch (vertical parties) failed
        with ``exc``: a live fleet waits for the party to come back; a fixed one cannot go on."""
        raise exc

    def await_edge(self) -> None:
        """Mid-span, with batches left and no edge to take them: a live fleet waits for one."""
        raise JobError("batches are left in a span and no edge is present")

    def on_all(self, method: str, per_edge_args: Optional[list[tuple]] = None, kind: str = "control",
               names: Optional[list[str]] = None, timeout: Optional[float] = None) -> list[Any]:
        """``method(*per_edge_args[k])`` on every edge k (of ``names``, when given; no arguments when
        None) at once, one call each; wait for all."""
        links = self.links if names is None else [self.links[self.names.index(name)] for name in names]
        per_edge_args = per_edge_args or [()] * len(links)
        waits = [link.send(method, args, kind, timeout) for link, args in zip(links, per_edge_args)]
        return self._gather(links, waits)

    def _gather(self, links: list[Link], waits: list[Callable[[], Any]]) -> list[Any]:
        """The results of calls sent to ``links``, in order; the first failure is raised."""
        return [wait_() for wait_ in waits]

    def sync(self, trained: set[str]) -> None:
        """Average the replicas that trained since the last sync (``trained``: edge names; an edge
        that has served its whole shard sits out the rest of the epoch and would only pull the
        average back) and push the average to every replica."""
        n = len(self.links)
        if n == 1 or not self.replicas:
            return  # one replica is its own average; a segment of the edge's own is no replica
        moved = [name for name in self.names if name in trained] or self.names  # the others hold the last average
        if self.own_weights:  # the edges fetch each other's replicas: the central only says when
            self.on_all("gather_average", [(moved,)] * n)
            self.on_all("apply_average")
            return
        states = self.on_all("get_state", kind="edge_state", names=moved)
        bad = poisoned(dict(zip(moved, states)))
        if bad:  # averaged, it would reach every edge; checkpointed, every resume
            raise JobError(f"the replicas of {', '.join(bad)} hold non-finite values at a sync: nothing of them "
                           f"is averaged or checkpointed (run the same command to resume from the last checkpoint)")
        self.average = average_states(states)
        self.on_all("set_state", [(self.average,)] * n, "edge_state")

    def state(self) -> dict[str, Tensor]:
        """The edge segments of the one synchronised model (after a sync any replica will do)."""
        return self.links[0].call("get_state", kind="edge_state")

    def export(self, step: int, job: str) -> dict[str, Any]:
        """Every edge's checkpoint part by edge name; with edge-held weights, each edge writes its
        part to its own disk and only its size and SHA-256 come back."""
        if self.own_weights:
            return dict(zip(self.names, self.on_all("save_part", [(step, job)] * len(self.links))))
        return dict(zip(self.names, self.on_all("export_state", kind="edge_state")))

    def restore(self, parts: dict[str, Any], names: list[str]) -> None:
        """Put the edges ``names`` back from their checkpoint parts (by edge name)."""
        self.on_all("import_state", [(parts[name],) for name in names], "edge_state", names)

    def restore_own(self, step: int, written: dict[str, Any], names: list[str]) -> None:
        """The edges ``names`` back from the parts they wrote to their own disks for ``step``
        (``written``: each part's size and SHA-256, as the central's checkpoint records them)."""
        self.on_all("load_part", [(step, written[name]) for name in names], "control", names)

    def adopt(self, newcomers: list[str], known: list[str], states: Optional[list[dict[str, Tensor]]]) -> None:
        """Edges a checkpoint does not know take the average of its edges' weights (``states``), or,
        when those stay on the edges, the average the ``known`` edges hold; their optimizers start
        fresh."""
        if states is not None:
            average = average_states(states)
            self.on_all("set_state", [(average,)] * len(newcomers), "edge_state", newcomers)
            return
        self.on_all("gather_average", [(known,)] * len(newcomers), "control", newcomers)
        self.on_all("apply_average", None, "control", newcomers)

    def memory_bytes(self) -> list[int]:
        return self.on_all("rss")

    def finish(self) -> None:
        self.transport.finish(self.timeout_s)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Membership:
    """The edges present in this attempt against those of the attempt before (``before``: None in
    a run's first): what the banner and metrics.jsonl record of every change."""

    def __init__(self, before: Optional[list[str]], now: list[str], step: int, averaged: list[str],
                 why: Optional[dict[str, str]] = None, requeued: int = 0, joined: Optional[list[str]] = None,
                 restored: Optional[dict[str, Optional[int]]] = None):
        self.before, self.now, self.step, self.averaged = before, now, step, averaged  # averaged: checkpointing.restore
        # A live fleet's (training.live): why each left, the batches given back, who joined (an edge
        # may leave and dial in again before one flush: it is in both lists), and, for a segment of
        # an edge's own (a vertical party), the checkpoint step it came back from (None: its first weights)
        self.why, self.requeued, self.restored = why or {}, requeued, restored or {}
        self.left = list(self.why) or [name for name in before or [] if name not in now]
        self.joined = joined if joined is not None else \
            [name for name in now if before is not None and name not in before]

    def record(self) -> dict[str, Any]:
        live = {"why": self.why, "requeued": self.requeued} if self.why or self.requeued else {}
        restored = {"restored_from_step": self.restored} if self.restored else {}
        return {"step": self.step, "edges": self.now, "left": self.left, "joined": self.joined, **live, **restored}

    def banner(self, cfg: Config) -> Optional[str]:
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
        if self.requeued:
            text += f"; {self.requeued} of their batches given back to the others"
        if self.why:
            text += "; " + "; ".join(f"{name}: {why}" for name, why in self.why.items())
        for name, step in self.restored.items():
            text += f"; {name} took " + ("its first weights (no checkpoint yet)" if step is None else
                                         f"its part of the checkpoint of step {step}")
        if self.averaged:
            text += f"; {', '.join(self.averaged)} from the average of the checkpoint's edge weights, optimizer fresh"
        absent = [f"edge{k}" for k in range(1, most + 1) if f"edge{k}" not in self.now]
        if absent and cfg.data.placement == "edge":
            text += f"; {', '.join(absent)}'s data is not trained on while away"
        return text
