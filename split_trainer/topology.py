"""Who is who in the job (rank 0 the central, ranks 1..N the edges), threads, and RPC start-up.

RPC rendezvous goes through torchrun's own store, under a prefix per torchrun attempt: after
a ``--max-restarts`` restart the store still holds the dead processes' addresses under the
default keys, and a fresh prefix makes the new group meet on empty keys.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
from torch.distributed import rpc

from .config import Config, ConfigError

SCHEME = "split-trainer"


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    edges: int
    local_world_size: int
    local_rank: int
    restart: int
    """torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt."""

    @property
    def is_central(self) -> bool:
        return self.rank == 0

    @property
    def name(self) -> str:
        return "central" if self.rank == 0 else f"edge{self.rank}"

    @property
    def edge_names(self) -> list[str]:
        return [f"edge{r}" for r in range(1, self.edges + 1)]


def topology_from_env(cfg: Config) -> Topology:
    """Read torchrun's environment and check the world size against the config."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world != cfg.world_size:
        raise ConfigError(
            f"world size {world} does not match topology.edges={cfg.topology.edges}: 1 central + "
            f"{cfg.topology.edges} edges needs {cfg.world_size} ranks; launch with torchrun "
            f"--nproc_per_node {cfg.world_size} (or set topology.edges={max(world - 1, 1)})")
    return Topology(rank=int(env.get("RANK", "0")), world_size=world, edges=cfg.topology.edges,
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
                    local_rank=int(env.get("LOCAL_RANK", env.get("RANK", "0"))),
                    restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_split(cores: int, local_edges: int, central_here: bool) -> list[int]:
    """This host's cores by role: [central's, edge's, edge's, ...] (no central entry when the
    central runs elsewhere). The central runs a turn for every batch of every edge, in order, while
    the edges each run a share of the batches side by side, so on its host the central gets as
    many cores as the edges there together; the edges split the rest evenly."""
    if not central_here:
        return [max(1, cores // local_edges + (i < cores % local_edges)) for i in range(local_edges)]
    if local_edges == 0:
        return [cores]
    central = max(1, cores // 2)
    rest = max(cores - central, 0)
    return [central] + [max(1, rest // local_edges + (i < rest % local_edges)) for i in range(local_edges)]


def set_threads(requested: int, topo: Topology) -> int:
    """Set this rank's intra-op threads: ``train.threads`` if given, else its share of the host's
    cores (``thread_split``), so that co-located ranks do not oversubscribe."""
    central_here = topo.rank - topo.local_rank == 0  # torchrun numbers ranks host by host
    split = thread_split(cores(), topo.local_world_size - central_here, central_here)
    threads = requested or split[topo.local_rank]
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or inter-op work already ran: harmless
        pass
    return threads


def device_for(requested: str, option: str, local_rank: int) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (as set by ``option``) for this rank: the ranks of one host
    share its GPUs round robin, so several ranks may share one GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda, but this host has no CUDA device torch can use: set {option}=cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _attempt_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs):
    query = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    env_url = "env://?" + "&".join(f"{k}={v}" for k, v in query.items())
    store, rank, world = next(dist.rendezvous(env_url, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    yield dist.PrefixStore(f"split_trainer/attempt{attempt}", store), rank, world
    raise RuntimeError("split_trainer rendezvous cannot be re-entered")


def init_rpc(topo: Topology, cfg: Config) -> None:
    try:
        dist.register_rendezvous_handler(SCHEME, _attempt_rendezvous)
    except RuntimeError:  # already registered by an earlier start in this process
        pass
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"{var} is not set: start split_trainer with torchrun "
                              f"(e.g. torchrun --nproc_per_node {cfg.world_size} -m split_trainer ...)")
    # TensorPipe's own choice between ranks of one host is its shared-memory transport, which
    # busy-polls: on a host with fewer spare cores than ranks the polling eats the compute.
    transports = {"tcp": ["uv"], "auto": None}[cfg.rpc.transport]
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=cfg.rpc.num_worker_threads, rpc_timeout=cfg.rpc.timeout_s, init_method=f"{SCHEME}://",
        _transports=transports, _channels=cfg.rpc.channels)
    with warnings.catch_warnings():  # upstream #149393: init_rpc's own Gloo group warns of itself
        warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")
        rpc.init_rpc(topo.name, rank=topo.rank, world_size=topo.world_size, rpc_backend_options=options)
