"""How a process takes its part in a job, chosen once, by name, from how it was started:

    rpc       under torchrun: rank 0 the central, the other ranks edges of one RPC group
    loopback  alone: the central with every edge in this process
    grpc      under torchrun on one machine: rank 0 serves on a free port and the other ranks dial
              it, with certificates made in the run folder; alone, the central only
    serve     ``python -m split_trainer serve --listen ADDR:PORT --certs DIR``: the central of a
              grpc job across machines; it listens, and the edges dial it
    edge      ``python -m split_trainer edge --central HOST:PORT --certs DIR``: one edge of such a
              job, who its certificate says; nothing listens on its host
    edges     ``python -m split_trainer edges --central HOST:PORT --certs DIR --count K``: K edges
              of such a job in one process, each with its own certificate and stream (many edges
              without a process each, for tests and simulation)

Each is one ``Launcher``: who this process is (its Topology), the transport the central builds,
how an edge process serves, and how often the central resumes within its own process after an
attempt fails (``serve``: its edges redial; under torchrun, torchrun restarts every rank instead).
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from split_trainer.config import Config, ConfigError
from split_trainer.transport.base import Host, Transport
from split_trainer.transport.topology import Topology, loopback_topology, topology_from_env

MODES = ("serve", "edge", "edges")
"""The commands of the grpc transport across machines (``python -m split_trainer serve|edge|edges``)."""


@dataclass(frozen=True)
class Launcher:
    name: str
    topology: Callable[[Config], Topology]
    transport: Callable[[Config, Topology], Transport]
    """The central's transport (built once, after the run's own checks)."""
    serve: Callable[[Config, Topology, Callable[[], Host]], None]
    """An edge process: load its data (``host()``) and serve the central until the job ends."""
    edges_here: bool = False
    """The edges run in the central's process (loopback)."""
    restarts: int = 0
    """Attempts after the first that the central makes in its own process (serve --max-restarts)."""
    exit_hard: bool = False
    """An edge process ends with os._exit: gRPC's threads can abort a finished edge in the
    interpreter's teardown ("terminate called without an active exception", 1 run in 3 under load)."""
    more: tuple[str, ...] = ()
    """The other edges this edge process serves (``edges``)."""

    def names_here(self, cfg: Config, topo: Topology) -> list[str]:
        """Who this process is: its own name, and the edges' when they run in it (faults are armed by name)."""
        return [topo.name, *(f"edge{k}" for k in range(1, cfg.topology.edges + 1) if self.edges_here), *self.more]


def add_arguments(parser: argparse.ArgumentParser, mode: Optional[str]) -> None:
    """The options of ``serve`` and ``edge`` (none for the torchrun form)."""
    if mode == "serve":
        parser.add_argument("--listen", required=True, metavar="ADDR:PORT",
                            help="where the central listens for its edges, e.g. 0.0.0.0:50051 (port 0: any free one, "
                                 "written to the run folder's grpc.address)")
        parser.add_argument("--certs", required=True, type=Path, metavar="DIR",
                            help="the central's folder from `python -m split_trainer certs` (DIR/central, or the "
                                 "job's folder that holds it)")
        parser.add_argument("--max-restarts", type=int, default=3, metavar="K",
                            help="after an attempt fails (an edge lost, say), resume from the newest checkpoint in "
                                 "this process up to K times, once the edges have dialled in again (default 3)")
    elif mode in ("edge", "edges"):
        parser.add_argument("--central", required=True, metavar="HOST:PORT",
                            help="the central's address, as this host reaches it (and as its certificate names it)")
        parser.add_argument("--certs", required=True, type=Path, metavar="DIR",
                            help="this edge's folder from `python -m split_trainer certs` (e.g. DIR/edge1): the "
                                 "edge is who its certificate says" if mode == "edge" else
                                 "the job's folder from `python -m split_trainer certs`, which holds edge1, edge2, ...")
    if mode == "edges":
        parser.add_argument("--count", required=True, type=int, metavar="K", help="how many edges this process runs")
        parser.add_argument("--first", type=int, default=1, metavar="N", help="the first one's number (default 1)")


def launcher_for(cfg: Config, mode: Optional[str], args: argparse.Namespace) -> Launcher:
    if mode == "serve":
        if args.max_restarts < 0:
            raise ConfigError(f"--max-restarts {args.max_restarts}: give 0 or more")
        return _serve(_address(args.listen, "--listen", resolve=True), args.certs, args.max_restarts)
    if mode == "edge":
        return _dial(_address(args.central, "--central", resolve=False), args.certs)
    if mode == "edges":
        if args.count < 1 or args.first < 1:
            raise ConfigError(f"--count {args.count} --first {args.first}: give 1 or more for each")
        return _dial_many(_address(args.central, "--central", resolve=False), args.certs, args.count, args.first)
    return {"rpc": _rpc, "loopback": _loopback, "grpc": _grpc_torchrun}[cfg.topology.transport]()


def _address(text: str, option: str, resolve: bool) -> str:
    """HOST:PORT, checked now in one line (gRPC would say it in two, and later). The central's own
    address must resolve; an edge's view of the central may not yet (it dials again)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{option} {text!r}: give HOST:PORT, e.g. 0.0.0.0:50051")
    if resolve:
        try:
            socket.getaddrinfo(host.strip("[]"), int(port))
        except OSError as exc:
            raise ConfigError(f"{option} {text!r}: {host} is not an address of this host ({exc.strerror or exc})") from None
    return text


def _rpc() -> Launcher:
    def transport(cfg: Config, topo: Topology) -> Transport:
        from split_trainer.transport.rpc import RpcTransport
        return RpcTransport(topo, cfg)

    def serve(cfg: Config, topo: Topology, host: Callable[[], Host]) -> None:
        from split_trainer.transport.rpc import serve_edge
        serve_edge(topo, cfg, host)
    return Launcher("rpc", topology_from_env, transport, serve)


def _loopback() -> Launcher:
    def transport(cfg: Config, topo: Topology) -> Transport:
        from split_trainer.training.hosting import loopback_transport
        return loopback_transport(cfg)
    return Launcher("loopback", lambda cfg: loopback_topology(), transport, _no_edges, edges_here=True)


def _grpc_torchrun() -> Launcher:
    """On one machine: certificates and the central's address in the run folder. Without torchrun
    (no WORLD_SIZE), the central alone, which edges started by hand dial."""
    def topology(cfg: Config) -> Topology:
        return topology_from_env(cfg) if "WORLD_SIZE" in os.environ else loopback_topology()

    def transport(cfg: Config, topo: Topology) -> Transport:
        from split_trainer.transport.grpc_central import GrpcTransport
        return GrpcTransport(cfg)

    def serve(cfg: Config, topo: Topology, host: Callable[[], Host]) -> None:
        from split_trainer.transport.grpc_edge import serve_edge_rank
        serve_edge_rank(topo.name, cfg, host)
    return Launcher("grpc", topology, transport, serve, exit_hard=True)


def _serve(listen: str, certs: Path, restarts: int) -> Launcher:
    def transport(cfg: Config, topo: Topology) -> Transport:
        from split_trainer.transport.grpc_central import GrpcTransport
        return GrpcTransport(cfg, bundle=certs, listen=listen)
    return Launcher("serve", lambda cfg: loopback_topology(), transport, _no_edges, restarts=restarts)


def _dial(central: str, certs: Path) -> Launcher:
    from split_trainer.transport import identity

    bundle = identity.load_bundle(certs)  # one line now for a missing or wrong bundle, before any data loads
    if bundle.name == identity.CENTRAL:
        raise ConfigError(f"--certs {certs} is the central's bundle: give this edge's folder (e.g. DIR/edge1)")

    def topology(cfg: Config) -> Topology:
        return Topology(rank=0, world_size=1, local_world_size=1, local_rank=0, restart=0, name=bundle.name,
                        central_here=False)

    def serve(cfg: Config, topo: Topology, host: Callable[[], Host]) -> None:
        from split_trainer.transport.grpc_edge import serve_edge_dialling
        serve_edge_dialling(central, bundle, cfg, host)
    return Launcher("edge", topology, _no_transport, serve, exit_hard=True)


def _dial_many(central: str, certs: Path, count: int, first: int) -> Launcher:
    """Edges ``first`` .. ``first + count - 1`` in this process, each dialling with its own bundle
    (``certs/edgeK``) on a thread of its own."""
    from split_trainer.transport import identity

    names = [f"edge{k}" for k in range(first, first + count)]
    bundles = [identity.load_bundle(certs / name) for name in names]  # one line now for a missing one

    def topology(cfg: Config) -> Topology:
        return Topology(rank=0, world_size=1, local_world_size=1, local_rank=0, restart=0, name=names[0],
                        central_here=False)

    def serve(cfg: Config, topo: Topology, host: Callable[..., Host]) -> None:
        from split_trainer.transport.grpc_edge import serve_edges_dialling
        serve_edges_dialling(central, bundles, cfg, host)
    return Launcher("edges", topology, _no_transport, serve, exit_hard=True, more=tuple(names[1:]))


def _no_edges(cfg: Config, topo: Topology, host: Any) -> None:
    raise ConfigError(f"{topo.name} is an edge, and this launch has none: start edges under torchrun or with "
                      f"`python -m split_trainer edge`")


def _no_transport(cfg: Config, topo: Topology) -> Transport:
    raise ConfigError("`python -m split_trainer edge` and `edges` run edges, not the central: start the central "
                      "with serve")
