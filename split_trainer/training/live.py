"""A live fleet (``topology.membership: live``; grpc, or loopback to try it): edges leave and join
while the others train, and no process restarts.

An edge *leaves* when its stream ends, its heartbeats stop (the transport drops it after
rpc.timeout_s of silence) or a call to it runs past rpc.timeout_s: the batches it had taken and
not yet brought to their turn go back to the span's queue, and the others train them, so no
batch is lost and none is trained twice (dispatch.Queue, or dispatch.Rotation under round robin,
which hands them round the others in turn). What its replica learned since the last sync leaves
with it. An edge whose certificate is valid *joins* at the next flush: it builds its edge from
the central's config and takes a present replica (at a sync, the average; sealed from a peer when
the edges hold the weights), with a fresh optimizer; with edge-held data it picks up its own
shard where it stopped (data.placement.EdgeData). Below topology.min_edges the central waits at
the flush, up to rpc.startup_timeout_s, for edges to dial in, then stops; the newest checkpoint
resumes the run.
"""

from __future__ import annotations

from concurrent.futures import FIRST_EXCEPTION, wait
from typing import Any, Callable, Optional

from split_trainer.config import Config
from split_trainer.core.errors import JobError, printable, short
from split_trainer.records import checkpoint
from split_trainer.training.fleet import Fleet, Membership
from split_trainer.transport.base import Transport
from split_trainer.transport.link import Link
from split_trainer.transport.topology import edge_number


class Left(JobError):
    """An edge of a live fleet went away (its call failed on the transport, not in its code)."""


def _left(exc: JobError) -> JobError:
    """``exc`` as a Left when the edge went away (the call failed on the transport), else itself."""
    if isinstance(exc, Left) or not isinstance(exc.__cause__, (ConnectionError, TimeoutError)):
        return exc
    left = Left(short(exc))
    left.__cause__ = exc
    return left


class LiveFleet(Fleet):
    """A Fleet whose members may change at every flush (and, with none left, mid-span)."""

    def __init__(self, cfg: Config, transport: Transport, names: list[str], replicas: bool = True):
        super().__init__(cfg, transport, names, replicas)
        self.cfg = cfg
        self.gone: dict[str, str] = {}  # edge -> why it left, since the last flush
        self.requeued = 0  # batches given back since the last flush
        self.restored: dict[str, Optional[int]] = {}  # edge -> the checkpoint step its own segment came back from

    def _guarded(self, work: Callable, k: int, share: list) -> None:
        try:
            super()._guarded(work, k, share)
        except JobError as exc:
            left = _left(exc)
            if left is exc:
                raise
            raise left from exc

    def _let_go(self, link: Link, exc: BaseException) -> None:
        self.gone.setdefault(link.name, printable(str(exc), 400))
        self.transport.drop(link.name, str(exc), link.remote.stream)  # a slow edge hears it and dials again

    def _gather(self, links: list[Link], waits: list[Callable[[], Any]]) -> list[Any]:
        """As Fleet's (for on_all); an edge that leaves during the call is let go, and, once every
        call has ended, Left is raised: the central refreshes the membership and does it again."""
        results, left = [], None
        for link, wait_ in zip(links, waits):
            try:
                results.append(wait_())
            except JobError as exc:
                left = _left(exc)
                if not isinstance(left, Left):
                    raise
                self._let_go(link, left)
        if left is not None:
            raise left
        return results

    def per_edge(self, work: Callable[[int, list], None], shares: list[list],
                 on_failure: Optional[Callable[[], None]] = None,
                 give_back: Optional[Callable[[int], int]] = None) -> None:
        """As Fleet's, but an edge that leaves ends its own thread only: its batches are given back
        (``give_back``), or, where nothing can take them (an evaluation's), Left is raised once the
        others are done, and the central does it again. Any other failure ends them all."""
        futures = {self.pool.submit(self._guarded, work, k, share): k for k, share in enumerate(shares) if share}
        self.in_flight, pending, left = list(futures), set(futures), None
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                exc, k = fut.exception(), futures[fut]
                if exc is None:
                    continue
                if isinstance(exc, Left):
                    self._let_go(self.links[k], exc)
                    if give_back is not None:
                        self.requeued += give_back(k)
                    else:
                        left = exc
                    continue
                if on_failure is not None:
                    on_failure()
                raise exc
        if left is not None:
            raise left

    def state(self) -> dict[str, Any]:
        """The edge segments from the first edge still present (after a sync every replica is the average)."""
        for link in self.links:
            try:
                return link.call("get_state", kind="edge_state")
            except JobError:
                continue
        raise JobError("every edge left before the edge segments could be fetched for model.pt (the newest "
                       "checkpoint holds them: python -m split_trainer export --checkpoint CHECKPOINT --out model.pt)")

    def memory_bytes(self) -> list[int]:
        """Every edge's RSS, 0 for one that left during the probe (it is let go)."""
        try:
            return super().memory_bytes()
        except Left:
            return [0] * len(self.links)

    def takers(self, wanted: list[int]) -> list[int]:
        present = [k for k, name in enumerate(self.names) if name not in self.gone]
        return [k for k in wanted if k in present] or present

    def await_edge(self) -> None:
        """No edge is left to take the span's remaining batches: wait for one to dial in."""
        self._join(self.transport.arrivals(self.present(), 1, self.cfg.rpc.startup_timeout_s))
        if len(self.present()) == 0:
            raise JobError(f"every edge left and none dialled in within rpc.startup_timeout_s="
                           f"{self.cfg.rpc.startup_timeout_s:g} s: stopped (run the same command to resume from the "
                           f"newest checkpoint)")

    def present(self) -> list[str]:
        return [name for name in self.names if name not in self.gone]

    def refresh(self, step: int) -> Optional[Membership]:
        """At a flush: drop the edges that left, wait (up to rpc.startup_timeout_s) while fewer
        than topology.min_edges are present, and take in the edges that dialled in."""
        for link in self.links:
            if not link.remote.attached():  # its stream ended while it had nothing to do
                self.gone.setdefault(link.name, f"{link.name}'s stream to the central ended")
        before, why, requeued = list(self.names), dict(self.gone), self.requeued
        keep = [k for k, name in enumerate(self.names) if name not in self.gone]
        self.departed += [link.snapshot() for link in self.links if link.name in self.gone]
        self.links = [self.links[k] for k in keep]
        self.reports = [self.reports[k] for k in keep]
        self.names = [self.names[k] for k in keep]
        self.gone, self.requeued, self.restored = {}, 0, {}
        fewest, present = self.cfg.topology.fewest, list(self.names)
        self._join(self.transport.arrivals(self.names, max(0, fewest - len(self.names)),
                                           self.cfg.rpc.startup_timeout_s))
        if len(self.names) < fewest:
            raise JobError(f"{len(self.names)} edges present, fewer than topology.min_edges={fewest}, and no more "
                           f"dialled in within rpc.startup_timeout_s={self.cfg.rpc.startup_timeout_s:g} s: stopped "
                           f"(run the same command to resume from the newest checkpoint)")
        joined = [name for name in self.names if name not in present]
        if not why and not joined:
            return None
        return Membership(before, list(self.names), step, [], why, requeued, joined, self.restored)

    def lost(self, exc: JobError) -> JobError:
        """``exc`` as a Left when an edge went away (each edge whose call failed so is let go)."""
        left = _left(exc)
        if isinstance(left, Left):
            for link in self.links:
                if link.failure is not None and isinstance(_left(link.failure), Left):
                    self._let_go(link, _left(link.failure))
        return left

    def pause(self, exc: JobError, step: int) -> None:
        """A party that left (every batch needs every party) is let go, and the step waits, up to
        rpc.startup_timeout_s, for it to dial in again; any other failure is raised."""
        if not isinstance(self.lost(exc), Left):
            raise exc
        change = self.refresh(step)
        if change is not None:
            self.changed(change)

    def _join(self, names: list[str]) -> None:
        """Each of ``names`` (attached to the transport, not in the fleet) builds its edge, takes
        its weights (``_weights_to``) and what its placement needs (``welcome``), and takes its
        place in the fleet's order (by edge number: a vertical party's part of the merge)."""
        for name in names:
            present = self.present()
            if self.replicas and not present and self.average is None:
                raise JobError(f"{name} cannot join: no edge is present to give it a replica, and "
                               + ("the central holds no average (privacy.edge_weights=edges)" if self.own_weights
                                  else "none had synced") + " (run the same command to resume from the newest checkpoint)")
            try:
                remote, = self.transport.connect([name], self.cfg)  # grpc: the certificate was the admission
                link = Link(name, remote, self.wire, self.timeout_s)
                report = link.call("about", timeout=self.cfg.rpc.startup_timeout_s)
                self.welcome(link)
                self._weights_to(link, present[0] if present else None)
            except JobError:
                continue  # it (or the edge it was to copy) left as it joined: the next flush tries again
            link.host = printable(report["host"])
            at = sum(edge_number(other) < edge_number(name) for other in self.names)
            self.links.insert(at, link)
            self.names.insert(at, name)
            self.reports.insert(at, report)

    def _weights_to(self, link: Link, source: Optional[str]) -> None:
        """The newcomer ``link`` takes the replica of edge ``source`` (None: the last average), or,
        where each edge holds a segment of its own, its part of the newest checkpoint."""
        if not self.replicas:
            self.restored[link.name] = self._part_to(link)
        elif self.own_weights:  # edge to edge, as at a sync: the central never holds the weights
            link.call("gather_average", ([source],))
            link.call("apply_average")
        else:
            state = self.average if source is None else \
                self.links[self.names.index(source)].call("get_state", kind="edge_state")
            link.call("set_state", (state,), "edge_state")

    def _part_to(self, link: Link) -> Optional[int]:
        """Edge ``link``'s part of the newest checkpoint, put back (from its own disk when the edges
        hold the weights); its step, or None when there is none yet (it keeps the weights its seed
        drew, the run's first). What it learned since is lost with it."""
        if self.newest is None:
            return None
        try:
            loaded = checkpoint.load(self.newest)
        except ValueError as exc:
            raise JobError(f"{link.name} cannot take its part of the newest checkpoint: {exc}") from exc
        written = loaded.manifest.get("edge_parts")
        if written is not None:
            link.call("load_part", (loaded.step, written[link.name]))
        else:
            link.call("import_state", (loaded.parts[link.name],), "edge_state")
        return loaded.step
