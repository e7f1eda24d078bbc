"""How an edge is put together, once, for every transport: what an edge process holds before the
central's config arrives (its own config, the data it loaded from its own data.root, its local
rank) and, when it does, the edge object (its plan, device, data, parts folder, peers and guard).
A transport receives an ``EdgeHost`` (transport.base.Host) and asks it to ``build`` each edge it
serves; it never needs to know what an edge is made of."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Optional

from split_trainer.config import Config
from split_trainer.training import policy
from split_trainer.training.drivers import driver_for
from split_trainer.training.edge import Edge, parts_folder
from split_trainer.transport.base import Peers
from split_trainer.transport.topology import device_for, edge_number

if TYPE_CHECKING:
    from split_trainer.transport.loopback import LoopbackTransport


class EdgeHost:
    """The edges ``numbers`` of one process: its own config ``own`` (its command line: where its data
    lies, where its checkpoint parts go), the data loaded now, before any transport is up (a missing
    folder fails here), and its ``local_rank`` (which device it takes)."""

    def __init__(self, own: Config, numbers: list[int], local_rank: int = 0):
        self.own, self.local_rank = own, local_rank
        self.loaded = driver_for(own).data.load_on_edge(own, numbers)

    def build(self, name: str, cfg: Config, peers: Peers, autograd: Any,
              guard: Callable[[], AbstractContextManager] = nullcontext) -> Edge:
        """Edge ``name`` from the central's ``cfg``, which decides the training once this process's
        own config agrees with it on what the edge is the authority on (training.policy); its own
        config alone decides where on this disk its checkpoint parts go and how many it keeps."""
        with policy.said(name):
            policy.check_config(name, self.own, cfg)
            driver = driver_for(cfg)
            device = device_for(cfg.train.edge_device, "train.edge_device", self.local_rank)
            data = driver.data.edge_data(cfg, self.loaded, edge_number(name))
            plan = driver.edge_plan(cfg, data)
            policy.check_segment(name, self.own, plan)
        # One part more than the edge's own checkpoint.keep: a part outlives a central checkpoint
        # that failed to land.
        return Edge(name, cfg, plan, device, data, parts_folder(self.own, name), self.own.checkpoint.keep + 1,
                    peers, autograd, guard)


def loopback_transport(cfg: Config, edge_secrets: Optional[dict[str, Optional[str]]] = None) -> "LoopbackTransport":
    """The loopback transport with every edge of ``cfg`` in this process (one disk, one data.root:
    the config this process was started with is also every edge's own)."""
    from split_trainer.transport.loopback import LoopbackTransport

    return LoopbackTransport(cfg, EdgeHost(cfg, list(range(1, cfg.topology.edges + 1))), edge_secrets)
