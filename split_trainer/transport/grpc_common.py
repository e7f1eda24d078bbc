"""What both ends of the grpc transport agree on (issue 36): the one method, the channel options
(keepalive and message sizes, set on both sides together), the heartbeat, and the run-folder
convention by which ranks of one machine find the central's port and their certificates.

The wire is one bidirectional stream per edge, ``/split_trainer.Fleet/Attach``, opened by the
edge: the central's calls go down it and the answers come up. Each gRPC message is one
transport.codec message (msgpack bytes); gRPC sees raw bytes (no protobuf, no codegen).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

from split_trainer.config import ConfigError
from split_trainer.core.files import write_text
from split_trainer.transport.codec import LIMITS
from split_trainer.transport.topology import attempt_prefix

SERVICE, METHOD = "split_trainer.Fleet", "Attach"
PATH = f"/{SERVICE}/{METHOD}"
ADDRESS_FILE = "grpc.address"
"""In the run folder: where the central listens (host:port), written once it does; the ranks of a
torchrun job on one machine read it there (no port is fixed in advance)."""
CERTS_FOLDER = "certs"
"""In the run folder: the job's certificates (transport.identity), made by the central's rank when
absent: on one machine every rank reads its own bundle from here."""
CONNECT_ID = 0
"""The answer to Connect (the edge built its edge object) carries this id; calls count from 1."""


def heartbeat_every(timeout_s: float) -> float:
    """How often each side says it is alive: often enough that rpc.timeout_s of silence means a
    dead or frozen peer, not a quiet one."""
    return max(0.05, min(5.0, timeout_s / 4))


def channel_options(timeout_s: float, server: bool) -> list[tuple[str, int]]:
    """gRPC's keepalive and size options. Both sides are set together, as gRPC's keepalive guide
    asks: a client that pings more often than the server permits is sent GOAWAY (too_many_pings)."""
    ping_ms = int(1000 * max(1.0, min(10.0, timeout_s / 2)))
    options = [("grpc.max_send_message_length", LIMITS.max_bytes),
               ("grpc.max_receive_message_length", LIMITS.max_bytes),
               ("grpc.keepalive_time_ms", ping_ms),
               ("grpc.keepalive_timeout_ms", int(1000 * max(1.0, min(20.0, timeout_s)))),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    if server:  # permit the client's pings (half its interval: timers are not exact)
        options.append(("grpc.http2.min_ping_interval_without_data_ms", ping_ms // 2))
    return options


def write_address(run_dir: Path, address: str, timeout_s: float) -> None:
    """The run folder's ``grpc.address`` (for people, and for edge ranks with no torchrun store to
    read), and, in a torchrun group, the same under this attempt's key in torchrun's store."""
    write_text(Path(run_dir) / ADDRESS_FILE, address + "\n")
    store = _attempt_store(timeout_s)
    if store is not None:
        store.set(ADDRESS_FILE, address)


def central_address(run_dir: Path, timeout_s: float) -> Callable[[], str]:
    """How an edge rank on the central's machine finds it, asked again at each dial. In a torchrun
    group: the address this attempt's central put in torchrun's store, waited for up to
    ``timeout_s``. The run folder's file may still hold the previous attempt's port, now dead, and
    by the next dial another program may listen there (another job's TensorPipe listener aborts its
    whole process on a stranger's bytes). Without torchrun's store: the run folder's file."""
    store = _attempt_store(timeout_s)
    if store is None:
        return lambda: read_address(run_dir, timeout_s)
    try:
        store.wait([ADDRESS_FILE], timedelta(seconds=timeout_s))
    except RuntimeError:  # torch's DistStoreError: the key never came
        raise ConfigError(f"this attempt's central announced no address within rpc.startup_timeout_s={timeout_s:g} "
                          f"s (did its rank start, with topology.transport=grpc?)") from None
    address = store.get(ADDRESS_FILE).decode()
    return lambda: address


def _attempt_store(timeout_s: float) -> Optional[Any]:
    """torchrun's own store under this attempt's prefix (every attempt meets on fresh keys, as
    the RPC ranks do: transport.topology); None outside torchrun, or with its store not shared."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(attempt_prefix(), store)


def read_address(run_dir: Path, timeout_s: float, poll_s: float = 0.1) -> str:
    """The central's address from the run folder, waited for up to ``timeout_s``
    (rpc.startup_timeout_s: the central writes it once it has loaded its data and listens)."""
    path, deadline = Path(run_dir) / ADDRESS_FILE, time.monotonic() + timeout_s
    while True:
        address = _read(path)
        if address:
            return address
        if time.monotonic() > deadline:
            raise ConfigError(f"the central wrote no address to {path} within rpc.startup_timeout_s="
                              f"{timeout_s:g} s (did its rank start, with topology.transport=grpc?)")
        time.sleep(poll_s)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
