"""The Python gRPC stack under the grpc transport, on its own: sync threads against grpc.aio, one
long-lived stream per edge against a unary call (a new HTTP/2 stream) per message.

    python benchmarks/grpc_stack.py                       # every variant and profile, 3 repeats (median)
    python benchmarks/grpc_stack.py --quick --repeats 1   # a quick check that every variant works

Over 127.0.0.1 with mutual TLS (certificates from transport.identity, the channel options of
transport.grpc_common), the central (server) in one process, three edges (clients, a channel and
certificate each) in another. ``threads-one-stream`` is the product's design: sync API, one
bidirectional stream per edge, the central's requests put in its outgoing queue and the replies
read on a thread of their own; ``threads-unary``, a unary call per exchange (the edge calls);
``aio-one-stream``, the product's design on grpc.aio at both ends. Profiles, each edge doing its
exchanges one after another: ``default-run``, 2,359,296 bytes each way (a batch of the default
run's activations, 64 x 64 x 12 x 12 float32), and ``small``, 200 bytes each way (a control call).

Reports, after a warm-up and as the median of the repeats: exchanges/s over all edges, MB/s of
payload (both ways), and CPU-ms per exchange of the server and of the client process (every
thread, over the measured window: on 2 cores CPU is what a split run runs out of). Prints a table
and writes it as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from split_trainer.transport import identity  # noqa: E402  (the checkout, not an installed copy)

EDGES = ["edge1", "edge2", "edge3"]
VARIANTS = ("threads-one-stream", "threads-unary", "aio-one-stream")
PROFILES = {"default-run": (2_359_296, 20, 200), "small": (200, 200, 2000)}  # bytes each way, warm-up, measured (per edge)
SERVICE, STREAM, UNARY = "grpc_stack.Bench", "Attach", "Exchange"
WAIT_S = 60.0  # the longest wait for one exchange, a listening port or the edges to attach
RUN_S = 300.0  # the longest one variant's run may take (the streams' gRPC deadline too)
HELLO = b"h"  # an edge's first message on a stream, as the product's Hello: the central drops it


class Window:
    """The measured window of one process: it opens at the ``start``-th exchange over all edges
    (the warm-up done) and closes at the ``end``-th; wall and CPU time (every thread) at each."""

    def __init__(self, start: int, end: int):
        self.start, self.end, self.count, self.lock = start, end, 0, threading.Lock()
        self.marks: list[tuple[float, float]] = []

    def tick(self) -> None:
        with self.lock:
            self.count += 1
            if self.count in (self.start, self.end):
                self.marks.append((time.perf_counter(), time.process_time()))

    def report(self) -> dict:
        if len(self.marks) != 2:
            raise RuntimeError(f"{self.count} exchanges of {self.end}: the window did not close")
        (wall0, cpu0), (wall1, cpu1) = self.marks
        return {"wall_s": wall1 - wall0, "cpu_s": cpu1 - cpu0, "exchanges": self.end - self.start}


def _check(reply: bytes, size: int) -> None:
    if len(reply) != size:
        raise RuntimeError(f"a reply of {len(reply)} bytes, not {size}")


def _rounds(run: Callable[[Any, int], None], ends: list, counts: list[int]) -> None:
    """The warm-up, then the measured exchanges, one thread per edge: every edge finishes the first
    before any starts the second, so that both processes' windows hold the same exchanges."""
    with ThreadPoolExecutor(len(ends)) as pool:
        for n in counts:
            list(pool.map(run, ends, [n] * len(ends), timeout=RUN_S))


# -- the central (server) ----------------------------------------------------------------------------
def _drain(requests: Iterator[bytes], replies: queue.Queue) -> None:
    try:
        for i, data in enumerate(requests):
            if i:  # not the hello
                replies.put(data)
    except Exception:  # the stream ended under it: the driver's wait times out and says so
        pass


def sync_server(args: argparse.Namespace, creds: Any, window: Window) -> None:
    import grpc
    request, peers, attached = os.urandom(args.size), {}, threading.Condition()

    def attach(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        outbox, replies = queue.Queue(), queue.Queue()
        with attached:
            peers[identity.peer_name(context)] = (outbox, replies)
            attached.notify_all()
        threading.Thread(target=_drain, args=(requests, replies), daemon=True).start()  # the replies
        while (item := outbox.get(timeout=RUN_S)) is not None:
            yield item

    def exchange(data: bytes, context: Any) -> bytes:
        window.tick()
        return request  # a reply of the same size

    def run(peer: tuple[queue.Queue, queue.Queue], n: int) -> None:
        for _ in range(n):
            peer[0].put(request)
            _check(peer[1].get(timeout=WAIT_S), args.size)
            window.tick()

    slots = len(EDGES) + 4  # as grpc_central: a stream holds a server thread while it lasts
    server = grpc.server(ThreadPoolExecutor(slots), options=args.options["server"], maximum_concurrent_rpcs=slots)
    handlers = {STREAM: grpc.stream_stream_rpc_method_handler(attach),  # raw bytes: no serializers
                UNARY: grpc.unary_unary_rpc_method_handler(exchange)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        _announce(args.port_file, port)
        if args.variant == "threads-one-stream":
            with attached:
                if not attached.wait_for(lambda: len(peers) == len(EDGES), WAIT_S):
                    raise RuntimeError(f"{len(peers)} of {len(EDGES)} edges attached within {WAIT_S:g} s")
            _rounds(run, list(peers.values()), [args.warmup, args.count])
        for outbox, _ in peers.values():
            outbox.put(None)  # ends the stream (OK): the edges' process ends
        sys.stdin.read()  # the parent closes it once the edges' process is done
    finally:
        for outbox, _ in peers.values():
            outbox.put(None)  # else a handler's thread would keep the process alive for RUN_S
        server.stop(0)


async def aio_server(args: argparse.Namespace, creds: Any, window: Window) -> None:
    import grpc
    request, peers, all_in = os.urandom(args.size), {}, asyncio.Event()

    async def drain(requests: AsyncIterator[bytes], replies: asyncio.Queue) -> None:
        first = True
        async for data in requests:
            if not first:
                replies.put_nowait(data)
            first = False

    async def attach(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        outbox, replies = asyncio.Queue(), asyncio.Queue()
        peers[identity.peer_name(context)] = (outbox, replies)
        if len(peers) == len(EDGES):
            all_in.set()
        reader = asyncio.create_task(drain(requests, replies))  # the replies, read on a task of their own
        try:
            while (item := await outbox.get()) is not None:  # no wait_for: a task per message (the run's is bounded)
                yield item
        finally:
            reader.cancel()

    async def run(peer: tuple[asyncio.Queue, asyncio.Queue], n: int) -> None:
        for _ in range(n):
            peer[0].put_nowait(request)
            _check(await peer[1].get(), args.size)
            window.tick()

    server = grpc.aio.server(options=args.options["server"], maximum_concurrent_rpcs=len(EDGES) + 4)
    handlers = {STREAM: grpc.stream_stream_rpc_method_handler(attach)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        _announce(args.port_file, port)
        await asyncio.wait_for(all_in.wait(), WAIT_S)
        for n in (args.warmup, args.count):  # every edge finishes its warm-up before any is measured
            await asyncio.wait_for(asyncio.gather(*(run(peer, n) for peer in peers.values())), RUN_S)
        for outbox, _ in peers.values():
            outbox.put_nowait(None)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await server.stop(0)  # cancels the handlers still waiting


def _announce(path: str, port: int) -> None:
    Path(path + ".tmp").write_text(str(port))
    os.replace(path + ".tmp", path)  # whole: the parent never reads half a port number


# -- the edges (clients) -----------------------------------------------------------------------------
def sync_edges(args: argparse.Namespace, creds: list[Any], window: Window) -> None:
    import grpc
    reply = os.urandom(args.size)

    def stream(channel: Any, n: int = 0) -> None:
        outbox: queue.Queue = queue.Queue()

        def outgoing() -> Iterator[bytes]:
            yield HELLO
            while (item := outbox.get(timeout=RUN_S)) is not None:
                yield item

        try:
            for data in channel.stream_stream(f"/{SERVICE}/{STREAM}")(outgoing(), timeout=RUN_S):
                window.tick()
                _check(data, args.size)
                outbox.put(reply)
        finally:
            outbox.put(None)

    def unary(channel: Any, n: int) -> None:
        call = channel.unary_unary(f"/{SERVICE}/{UNARY}")  # raw bytes: no serializers
        for _ in range(n):
            _check(call(reply, timeout=WAIT_S), args.size)
            window.tick()

    channels = [grpc.secure_channel(args.address, c, options=args.options["client"]) for c in creds]
    try:
        if args.variant == "threads-unary":
            _rounds(unary, channels, [args.warmup, args.count])
        else:
            _rounds(stream, channels, [0])
    finally:
        for channel in channels:
            channel.close()


async def aio_edges(args: argparse.Namespace, creds: list[Any], window: Window) -> None:
    import grpc
    reply = os.urandom(args.size)

    async def stream(channel: Any) -> None:
        call = channel.stream_stream(f"/{SERVICE}/{STREAM}")(timeout=RUN_S)
        await call.write(HELLO)
        while (data := await call.read()) is not grpc.aio.EOF:
            window.tick()
            _check(data, args.size)
            await call.write(reply)
        if await call.code() != grpc.StatusCode.OK:
            raise RuntimeError(f"the stream ended with {await call.code()}: {await call.details()}")

    channels = [grpc.aio.secure_channel(args.address, c, options=args.options["client"]) for c in creds]
    try:
        await asyncio.wait_for(asyncio.gather(*(stream(channel) for channel in channels)), RUN_S)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def child(args: argparse.Namespace) -> None:
    """One side of one run, in a process of its own; its window as JSON, the last line on stdout."""
    import grpc
    aio, certs, window = args.variant.startswith("aio"), Path(args.certs), Window(len(EDGES) * args.warmup, len(EDGES) * (args.warmup + args.count))
    if args.role == "server":
        b = identity.load_bundle(certs / identity.CENTRAL)
        creds = grpc.ssl_server_credentials([(b.key_pem, b.cert_pem)], root_certificates=b.ca_pem,
                                            require_client_auth=True)
        run = aio_server if aio else sync_server
    else:
        creds = [grpc.ssl_channel_credentials(root_certificates=b.ca_pem, private_key=b.key_pem,
                                              certificate_chain=b.cert_pem)
                 for b in (identity.load_bundle(certs / name) for name in EDGES)]
        run = aio_edges if aio else sync_edges
    done = run(args, creds, window)
    if aio:
        asyncio.run(done)
    print(json.dumps(window.report()), flush=True)


# -- the parent --------------------------------------------------------------------------------------
def run_once(variant: str, size: int, warmup: int, count: int, certs: Path, work: Path, options: dict) -> dict:
    """One variant and profile: the server process, then the edges' process; both always ended."""
    port_file, tag = work / f"port-{time.monotonic_ns()}", f"{variant}-{size}"
    cmd = [sys.executable, __file__, "--variant", variant, "--size", str(size), "--warmup", str(warmup),
           "--count", str(count), "--certs", str(certs), "--options", json.dumps(options)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    logs = {role: (work / f"{tag}-{role}.log").open("w+") for role in ("server", "client")}
    server = subprocess.Popen([*cmd, "--role", "server", "--port-file", str(port_file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=logs["server"], env=env, text=True)
    client = None
    try:
        deadline = time.monotonic() + WAIT_S
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the server did not listen: {_tail(logs['server'])}")
            time.sleep(0.05)
        client = subprocess.Popen([*cmd, "--role", "client", "--address", f"127.0.0.1:{port_file.read_text()}"],
                                  stdout=subprocess.PIPE, stderr=logs["client"], env=env, text=True)
        client_out = client.communicate(timeout=RUN_S + WAIT_S)[0]
        server_out = server.communicate(input="", timeout=WAIT_S)[0]
        for role, proc in (("client", client), ("server", server)):
            if proc.returncode != 0:
                raise RuntimeError(f"{tag}: the {role} failed (exit {proc.returncode}): {_tail(logs[role])}")
        ends = {"server": json.loads(server_out.splitlines()[-1]), "client": json.loads(client_out.splitlines()[-1])}
        driver = ends["client" if variant == "threads-unary" else "server"]  # who starts each exchange
        return {"exchanges_per_s": driver["exchanges"] / driver["wall_s"],
                "cpu_ms_server": 1000 * ends["server"]["cpu_s"] / ends["server"]["exchanges"],
                "cpu_ms_client": 1000 * ends["client"]["cpu_s"] / ends["client"]["exchanges"]}
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs.values():
            log.close()


def _tail(log: Any) -> str:
    log.flush()
    log.seek(0)
    return " | ".join(log.read().strip().splitlines()[-3:]) or "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the exchanges: checks that every variant works")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant and profile (the median is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark" / "grpc_stack.json")
    for hidden in ("--role", "--variant", "--certs", "--address", "--port-file", "--options"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--size", "--warmup", "--count"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        args.options = {side: [tuple(o) for o in opts] for side, opts in json.loads(args.options).items()}
        child(args)
        return 0
    # the product's options, worked out here once: the children need not import torch for them
    from split_trainer.config.run import RpcConfig
    from split_trainer.transport.grpc_common import channel_options
    timeout_s = RpcConfig().timeout_s
    options = {"server": channel_options(timeout_s, server=True), "client": channel_options(timeout_s, server=False)}
    profiles = {name: (size, max(2, w // 4), max(5, n // 10)) if args.quick else (size, w, n)
                for name, (size, w, n) in PROFILES.items()}
    runs: dict[tuple[str, str], list[dict]] = {(v, p): [] for v in VARIANTS for p in profiles}
    with tempfile.TemporaryDirectory(prefix="grpc_stack_") as tmp:
        work = Path(tmp)
        identity.make_job(work / "certs", EDGES)
        try:
            for _ in range(args.repeats):  # repeats outermost: a slow spell of the machine hits every variant
                for (variant, profile), found in runs.items():
                    found.append(run_once(variant, *profiles[profile], work / "certs", work, options))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"benchmarks/grpc_stack.py: error: {str(exc).strip()}", file=sys.stderr)
            return 1
    return report(args, runs, profiles)


def report(args: argparse.Namespace, runs: dict[tuple[str, str], list[dict]], profiles: dict) -> int:
    import grpc
    rows = []
    print(f"{'variant':<20} {'profile':<12} {'exch/s':>9} {'MB/s':>8} {'CPU-ms/exch server':>19} {'client':>7}  repeats (exch/s)")
    for (variant, profile), found in runs.items():
        size = profiles[profile][0]
        row = {"variant": variant, "profile": profile, **{k: statistics.median(r[k] for r in found) for k in found[0]},
               "repeats": [round(r["exchanges_per_s"], 1) for r in found]}
        row["mb_per_s"] = row["exchanges_per_s"] * 2 * size / 1e6  # payload, both ways
        rows.append(row)
        print(f"{variant:<20} {profile:<12} {row['exchanges_per_s']:>9.1f} {row['mb_per_s']:>8.1f} "
              f"{row['cpu_ms_server']:>19.3f} {row['cpu_ms_client']:>7.3f}  {row['repeats']}")
    info = {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(), "grpcio": grpc.__version__}
    out = {"machine": info, "quick": args.quick, "repeats": args.repeats, "edges": len(EDGES),
           "profiles": {k: dict(zip(("bytes_each_way", "warmup_per_edge", "exchanges_per_edge"), v))
                        for k, v in profiles.items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
