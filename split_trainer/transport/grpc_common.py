"""What both ends of the grpc transport agree on (issue 36): the one method, the channel options
(keepalive and message sizes, set on both sides together), the heartbeat, and the run-folder
convention by which ranks of one machine find the central's port and their certificates.

The wire is one bidirectional stream per edge, ``/split_trainer.Fleet/Attach``, opened by the
edge: the central's calls go down it and the answers come up. Each gRPC message is one
transport.codec message (msgpack bytes); gRPC sees raw bytes (no protobuf, no codegen).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from split_trainer.config import ConfigError
from split_trainer.core.files import write_text
from split_trainer.transport.codec import LIMITS

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


def write_address(run_dir: Path, address: str) -> None:
    write_text(Path(run_dir) / ADDRESS_FILE, address + "\n")


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
