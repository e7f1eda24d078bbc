"""Who is who in the job (the central and edge1..edgeN), threads, and RPC start-up.

RPC rendezvous goes through torchrun's own store, under a prefix per torchrun attempt: after
a ``--max-restarts`` restart the store still holds the dead processes' addresses under the
default keys, and a fresh prefix makes the new group meet on empty keys. An elastic fleet's hosts
count their restarts apart (a membership change is no restart), so there each round's workers
meet in a store of their own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) without a prefix.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import torch
import torch.distributed as dist
from torch.distributed import rpc

from split_trainer.config import Config, ConfigError
from split_trainer.core.errors import JobError, say, short

SCHEME = "split-trainer"


ROLE = "SPLIT_TRAINER_ROLE"
"""Set by the launch scripts of an elastic fleet: central or edge. Rendezvous ranks then follow
arrival, so the role comes from how a host was launched, not from its rank."""
EDGE_NUMBERS = "SPLIT_TRAINER_EDGES"
"""An elastic edge host's edge numbers, one per local rank (e.g. 3,4: edge3 and edge4)."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_world_size: int
    local_rank: int
    restart: int
    """torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt."""
    name: str
    """central, or edgeK: an edge's name is its identity (its shard, its checkpoint part)."""
    central_here: bool
    """This host runs the central (it gets a share of the cores by that role)."""

    @property
    def is_central(self) -> bool:
        return self.name == "central"


def edge_number(name: str) -> int:
    return int(name.removeprefix("edge"))


def topology_from_env(cfg: Config) -> Topology:
    """Read torchrun's environment (and the launch scripts' roles) and check the world size."""
    env = os.environ
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", rank))
    fewest, most = cfg.topology.fewest, cfg.topology.edges
    if not fewest + 1 <= world <= most + 1:
        edges, wanted = (f"{most}", f"{most + 1}") if fewest == most else \
            (f"{fewest}..{most}", f"{fewest + 1} to {most + 1}")
        raise ConfigError(
            f"world size {world} does not match topology.edges={most}: 1 central + {edges} edges needs {wanted} "
            f"ranks; launch with torchrun --nproc_per_node {most + 1} (or set topology.edges={max(world - 1, 1)}, or "
            f"topology.transport=loopback to run the job in this one process)")
    role = env.get(ROLE)
    if role is None:  # one host, or a static rendezvous: ranks are numbered host by host, rank 0 the central
        name, central_here = "central" if rank == 0 else f"edge{rank}", rank - local_rank == 0
    elif role == "central":
        name, central_here = "central", True
    else:
        numbers = env.get(EDGE_NUMBERS, "").split(",")
        if local_rank >= len(numbers) or not numbers[local_rank].isdigit() or not 1 <= int(numbers[local_rank]) <= most:
            raise ConfigError(f"{EDGE_NUMBERS}={env.get(EDGE_NUMBERS, '')!r} names no edge 1..{most} for local rank "
                              f"{local_rank}: start edge hosts with launch/edge.sh")
        name, central_here = f"edge{int(numbers[local_rank])}", False
    return Topology(rank=rank, world_size=world, local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
                    local_rank=local_rank, restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), name=name,
                    central_here=central_here)


def loopback_topology() -> Topology:
    """The one process of a loopback run: the central, with every edge inside it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("topology.transport=loopback runs the whole job in one process: start it with "
                          "python -m split_trainer, not torchrun (or set topology.transport=rpc)")
    return Topology(rank=0, world_size=1, local_world_size=1, local_rank=0, restart=0, name="central",
                    central_here=True)


def members() -> list[str]:
    """The edges in this RPC group, by number: whoever the rendezvous brought (after init_rpc)."""
    names = [w.name for w in rpc.api._get_current_rpc_agent().get_worker_infos() if w.name != "central"]
    return sorted(names, key=edge_number)


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
    central_here = topo.central_here
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


def attempt_prefix() -> str:
    """The keys of this torchrun attempt in torchrun's own store (TORCHELASTIC_RESTART_COUNT)."""
    return f"split_trainer/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _attempt_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs):
    query = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    env_url = "env://?" + "&".join(f"{k}={v}" for k, v in query.items())
    store, rank, world = next(dist.rendezvous(env_url, timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        yield store, rank, world  # a fresh store for every round (the elastic launch scripts' choice)
    else:  # torchrun's own store, reused by every attempt; in a group that restarts together, counts agree
        yield dist.PrefixStore(attempt_prefix(), store), rank, world
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
    # The Gloo group inside init_rpc connects every rank to every other, and retries a connection
    # that is never answered (a host behind NAT or a firewall) for half an hour. The main thread is
    # then inside C++, where no Python signal handler or exception reaches it: only an exit does.
    watchdog = threading.Timer(cfg.rpc.startup_timeout_s, _never_formed, args=(topo.name, cfg.rpc.startup_timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        with warnings.catch_warnings():  # upstream #149393: init_rpc's own Gloo group warns of itself
            warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")
            rpc.init_rpc(topo.name, rank=topo.rank, world_size=topo.world_size, rpc_backend_options=options)
    except RuntimeError as exc:  # a peer that gave up first closes its connections: Gloo raises here
        raise JobError(f"the RPC group did not form ({short(exc)}): {UNREACHABLE}") from None
    finally:
        watchdog.cancel()


UNREACHABLE = ("torch RPC needs every host to accept connections from every other host; where hosts sit behind NAT or "
               "a firewall that refuses inbound connections, use topology.transport=grpc (the edges dial out)")


def _never_formed(name: str, timeout_s: float) -> None:
    say(f"split_trainer: [{name}] error: the RPC group did not form within rpc.startup_timeout_s={timeout_s:g} s: "
        f"{UNREACHABLE}")
    os._exit(1)
