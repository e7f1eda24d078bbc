"""Split training over shaped links: the central and each edge host in its own network namespace.

    sudo python benchmarks/links.py --rate 20mbit --edges 3                # float32, one batch in flight
    sudo python benchmarks/links.py --rate 20mbit --dtypes float32 bfloat16 int8 --in-flight 1 2
    sudo python benchmarks/links.py --rate 1gbit                           # where compute takes over
    sudo python benchmarks/links.py --rate 20mbit --edge-loss local --dtypes int8 --in-flight 4 \
        --set model.bottleneck=8                                           # nothing comes back down
    sudo python benchmarks/links.py --rate 20mbit --transports rpc grpc   # torch RPC against gRPC + mutual TLS

Each host is a network namespace joined to the others by a veth pair on a bridge (in a namespace
of its own: nothing changes outside the namespaces this script makes). Each edge host's link is
shaped with ``tc tbf`` at ``--rate`` in both directions; the central's link is not shaped. The
hosts start as a user would start them, in edge placement: on the rpc transport with
launch/central.sh and launch/edge.sh and ``rpc.channels=[basic]``, so that tensor payloads cross
the veths (between processes of one machine TensorPipe would otherwise move them by cross-memory
attach, outside any network: docs/performance.md); on grpc with launch/grpc_central.sh and
launch/grpc_edge.sh (the serve and edge commands: every byte goes through the TLS socket).

Reports, per setting: samples/s after the warm-up; the tensor bytes per sample each way (wire
accounting); and each edge link's utilisation, the bytes the interface really moved per second
each way (payload, protocol and control together) as a share of the shaped rate. A split run over
a link cannot beat rate / bytes per sample. Needs root and ``ip netns``: without them it says so
in one line and exits 2. Every namespace it made is removed on the way out, a failed run included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
PORT = 29500  # the rendezvous port inside the central's own namespace: nothing else listens there


def _ip(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def refuse_inbound(ns: str) -> None:
    """A firewall in host ``ns`` that drops every new inbound TCP connection (an edge behind NAT or
    a site firewall): a SYN without ACK arriving on ``v0`` is redirected into a veth whose peer is
    down, where it is dropped. Outbound connections and their replies pass. (This machine has no
    iptables or nft, and no tc gact; tc's u32 and mirred are what it has.)"""
    _ip("link", "add", "sink", "type", "veth", "peer", "name", "sink1", ns=ns)
    _ip("link", "set", "sink", "up", ns=ns)
    _tc(ns, "qdisc", "add", "dev", "v0", "ingress")
    _tc(ns, "filter", "add", "dev", "v0", "parent", "ffff:", "protocol", "ip", "prio", "1", "u32",
        "match", "ip", "protocol", "6", "0xff",  # TCP
        "match", "u8", "0x05", "0x0f", "at", "0",  # an IP header of 20 bytes, so the TCP flags are at 33
        "match", "u8", "0x02", "0x12", "at", "33",  # SYN set, ACK clear: a new connection
        "action", "mirred", "egress", "redirect", "dev", "sink")


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {ns}: {done.stderr.strip()}")


def rate_bits(rate: str) -> float:
    """tc's rate syntax (20mbit, 1gbit, 500kbit) in bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit|bit)", rate)
    if not match:
        raise ValueError(f"--rate {rate}: give it as tc does, e.g. 20mbit, 1gbit")
    return float(match.group(1)) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match.group(2)]


def require_root() -> None:
    """One line and exit 2 where namespaces cannot be made."""
    why = None
    if os.geteuid() != 0:
        why = "it needs root (network namespaces, veth pairs, tc)"
    elif not shutil.which("ip") or not shutil.which("tc"):
        why = "it needs the ip and tc commands (iproute2)"
    if why:
        print(f"benchmarks/links.py: error: {why}: run it as root on Linux", file=sys.stderr)
        sys.exit(2)


class Hosts:
    """A central host and ``edges`` edge hosts, each a namespace with one veth (``v0``) on a bridge
    in a switch namespace; edge hosts' links shaped both ways at ``rate`` (None: unshaped)."""

    def __init__(self, prefix: str, edges: int, rate: str | None, queue_ms: float = 50, inbound: bool = True):
        self.prefix, self.rate, self.queue_ms, self.inbound = prefix, rate, queue_ms, inbound
        self.names = [f"{prefix}c", *(f"{prefix}e{k}" for k in range(1, edges + 1))]
        self.switch = f"{prefix}sw"
        self.address = {name: f"10.231.0.{i + 1}" for i, name in enumerate(self.names)}

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, name in enumerate(self.names):
            _ip("netns", "add", name)
            _ip("link", "set", "lo", "up", ns=name)
            port = f"p{i}"
            _ip("link", "add", "v0", "netns", name, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("link", "set", port, "master", "br0", ns=self.switch)
            _ip("link", "set", port, "up", ns=self.switch)
            _ip("addr", "add", f"{self.address[name]}/24", "dev", "v0", ns=name)
            _ip("link", "set", "v0", "up", ns=name)
            if self.rate and i > 0:  # uplink: the edge host's egress; downlink: the bridge port's egress
                for ns, dev in ((name, "v0"), (self.switch, port)):
                    _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", "32kb",
                        "latency", f"{self.queue_ms:g}ms")
            if not self.inbound and i > 0:
                refuse_inbound(name)

    def down(self) -> None:
        """Every process still in a namespace killed (torchrun starts its workers in sessions of
        their own, out of reach of a process-group kill), then the namespaces deleted."""
        for ns in [*self.names, self.switch]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in map(int, pids.split()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def counters(self, name: str) -> tuple[int, int]:
        """(bytes sent, bytes received) so far by host ``name``'s link."""
        stats = json.loads(_ip("-s", "-j", "link", "show", "v0", ns=name))[0]["stats64"]
        return stats["tx"]["bytes"], stats["rx"]["bytes"]


@contextmanager
def hosts(prefix: str, edges: int, rate: str | None, queue_ms: float = 50, inbound: bool = True) -> Iterator[Hosts]:
    """Namespaces that exist only inside the block, whatever happens in it (SIGTERM included)."""
    made = Hosts(prefix, edges, rate, queue_ms, inbound)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        made.up()
        yield made
    finally:
        made.down()
        signal.signal(signal.SIGTERM, previous)


def spawn(ns: str, cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "IFNAME": "v0", **env}
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, env=env, stdout=log.open("a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def commands(net: Hosts, transport: str, overrides: list[str], run_dir: Path) -> list[tuple[str, list[str], Path]]:
    """How each host starts its part of one job, as a user would start it: (namespace, command,
    log). rpc: launch/central.sh and launch/edge.sh (a torchrun group); grpc: launch/grpc_central.sh
    (``serve``) and launch/grpc_edge.sh (``edge``), with certificates made for the job first."""
    edges, central = len(net.names) - 1, net.address[net.names[0]]
    common = ["--config", "configs/mnist_edge_data.yaml", "--quiet", "--set", f"topology.edges={edges}",
              f"output.run_dir={run_dir}", *overrides]
    log = run_dir.parent / f"{run_dir.name}-central.log"
    logs = [run_dir.parent / f"{run_dir.name}-edge{k}.log" for k in range(1, edges + 1)]
    if transport == "rpc":
        return [(net.names[0], ["bash", "launch/central.sh", "--hosts", str(edges), "--port", str(PORT), *common], log),
                *((name, ["bash", "launch/edge.sh", "--central", f"{central}:{PORT}", "--hosts", str(edges), "--node",
                          str(k), "--edges", "1", *common], logs[k - 1]) for k, name in enumerate(net.names[1:], 1))]
    certs = run_dir.parent / f"{run_dir.name}-certs"
    subprocess.run([sys.executable, "-m", "split_trainer", "certs", "--out", str(certs), "--edges", str(edges),
                    "--central-host", central], cwd=ROOT, check=True, capture_output=True, timeout=120)
    # --restarts 0: a process that is killed stays down (the caller decides: tests start it again)
    return [(net.names[0], ["bash", "launch/grpc_central.sh", "--restarts", "0", "--listen", f"{central}:{PORT}",
                            "--certs", str(certs / "central"), *common], log),
            *((name, ["bash", "launch/grpc_edge.sh", "--restarts", "0", "--central", f"{central}:{PORT}", "--certs",
                      str(certs / f"edge{k}"), *common, f"output.run_dir={run_dir}-edge{k}"], logs[k - 1])
              for k, name in enumerate(net.names[1:], 1))]


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` and of its descendants alive now (/proc; ended ones drop out)."""
    total, todo = 0.0, [pid]
    while todo:
        try:
            fields = Path(f"/proc/{todo[-1]}/stat").read_text().rsplit(")", 1)[1].split()
            children = [int(c) for task in Path(f"/proc/{todo[-1]}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except OSError:
            children, fields = [], None
        todo.pop()
        if fields:
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            todo += children
    return total


def run_job(net: Hosts, overrides: list[str], run_dir: Path, timeout: float, transport: str = "rpc") -> dict:
    """One job over the namespaces, each host started as ``commands`` says; interface counters
    and each host's CPU sampled while it runs. Returns its records and samples."""
    samples: list[tuple[float, list[tuple[int, int]]]] = [(time.time(), [net.counters(n) for n in net.names[1:]])]
    procs = [spawn(ns, cmd, log) for ns, cmd, log in commands(net, transport, overrides, run_dir)]
    cpu: list[tuple[float, list[tuple[float]]]] = []  # (time, [(CPU seconds,) per host: central, edges])
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append((time.time(), [net.counters(name) for name in net.names[1:]]))
            cpu.append((time.time(), [(cpu_seconds(proc.pid),) for proc in procs]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop.set()
        sampler.join()
        for proc in procs:  # a job that did not end by itself: torchrun passes SIGTERM on to its workers
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        samples.append((time.time(), [net.counters(name) for name in net.names[1:]]))
    if procs[0].returncode != 0:
        raise RuntimeError(f"the job failed (central exit {procs[0].returncode}; its log: "
                           f"{run_dir.parent / (run_dir.name + '-central.log')})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "summary": json.loads((run_dir / "summary.json").read_text()), "counters": samples,
            "cpu": cpu}


def _at(samples: list, when: float) -> list[tuple[float, float]]:
    """Each link's counters at ``when``, interpolated between samples."""
    before = max((s for s in samples if s[0] <= when), key=lambda s: s[0], default=samples[0])
    after = min((s for s in samples if s[0] >= when), key=lambda s: s[0], default=samples[-1])
    share = 0.0 if after[0] == before[0] else (when - before[0]) / (after[0] - before[0])
    return [tuple(b + share * (a - b) for b, a in zip(lb, la)) for lb, la in zip(before[1], after[1])]


def measure(job: dict, warmup: int, batch: int, rate: float | None) -> dict:
    steps = [r for r in job["records"] if "loss" in r]
    start = next(r for r in steps if r["step"] >= warmup)
    end = steps[-1]
    seconds = end["time"] - start["time"]
    samples = (end["step"] - start["step"]) * batch
    first, last = _at(job["counters"], start["time"]), _at(job["counters"], end["time"])
    up = [(l[0] - f[0]) / seconds for f, l in zip(first, last)]  # bytes/s each edge host sent
    down = [(l[1] - f[1]) / seconds for f, l in zip(first, last)]
    kinds = job["summary"]["bytes"]["per_edge"].values()
    train_samples = job["summary"]["steps"] * batch
    kinds_up = ("activations", "labels", "edge_state", "control")
    result = {"samples_per_s": samples / seconds, "steps_measured": end["step"] - start["step"],
              "accounted_bytes_per_sample": {
                  "up": sum(e["received"].get(k, 0) for e in kinds for k in kinds_up) / train_samples,
                  "down": sum(e["sent"].get(k, 0) for e in kinds for k in ("inputs", "activation_grads", "edge_state", "control"))
                  / train_samples},
              "link_bytes_per_sample": {"up": sum(up) / (samples / seconds), "down": sum(down) / (samples / seconds)},
              "link_bytes_per_s": {"up": up, "down": down},
              # the whole job, start-up and evaluation included: what the edge links moved against
              # the tensor bytes the central accounted (all kinds)
              "job_link_bytes": {"up": sum(l[0] - f[0] for f, l in zip(job["counters"][0][1], job["counters"][-1][1])),
                                 "down": sum(l[1] - f[1] for f, l in zip(job["counters"][0][1], job["counters"][-1][1]))},
              "job_accounted_bytes": {"up": job["summary"]["bytes"]["received_total"],
                                      "down": job["summary"]["bytes"]["sent_total"]},
              "test_accuracy": job["summary"]["test_accuracy"]}
    if job["cpu"]:  # what each host's processes spent per trained sample in the measured window
        spent = [b[0] - a[0] for a, b in zip(_at(job["cpu"], start["time"]), _at(job["cpu"], end["time"]))]
        result["cpu_ms_per_sample"] = {"central": 1000 * spent[0] / samples, "edges": 1000 * sum(spent[1:]) / samples}
    if rate:
        result["utilisation"] = {"up": [8 * b / rate for b in up], "down": [8 * b / rate for b in down]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="20mbit", help="each edge host's link, both ways (tc syntax); 0: unshaped")
    parser.add_argument("--edges", type=int, default=3, help="edge hosts, one edge each")
    parser.add_argument("--queue-ms", type=float, default=50,
                        help="each shaped link's queue, in ms at its rate (tbf latency)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="rpc.activation_dtype values to run")
    parser.add_argument("--in-flight", nargs="+", type=int, default=[1], help="train.in_flight values to run")
    parser.add_argument("--edge-loss", nargs="+", default=["central"], choices=["central", "local"],
                        help="train.edge_loss values to run (local: nothing comes back down)")
    parser.add_argument("--channels", nargs="+", default=["basic"], choices=["basic", "auto"],
                        help="rpc.channels: basic (payloads cross the veths) or auto (TensorPipe's choice)")
    parser.add_argument("--transports", nargs="+", default=["rpc"], choices=["rpc", "grpc"],
                        help="topology.transport values to run: rpc (launch/central.sh, launch/edge.sh) or grpc "
                             "(the serve and edge commands, mutual TLS)")
    parser.add_argument("--steps", type=int, default=150, help="steps in all, warm-up included")
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the measurement")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MNIST IDX files (every edge host's data.root)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more split_trainer overrides for every run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "links" / "links.json")
    parser.add_argument("--prefix", default=f"st{os.getpid() % 100000}", help="namespace name prefix")
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait for one job, in seconds")
    args = parser.parse_args()
    require_root()
    try:
        rate = None if args.rate == "0" else rate_bits(args.rate)
    except ValueError as exc:
        print(f"benchmarks/links.py: error: {exc}", file=sys.stderr)
        return 2
    rows = []
    runs = args.out.parent / f"{args.out.stem}-runs"  # each job's run folder and logs, to look into
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    try:
        with hosts(args.prefix, args.edges, None if rate is None else args.rate, args.queue_ms) as net:
            settings = [(t, c) for t in args.transports for c in (args.channels if t == "rpc" else ["-"])]
            for (transport, channels), loss, dtype, in_flight in itertools.product(settings, args.edge_loss,
                                                                                   args.dtypes, args.in_flight):
                row = {"rate": args.rate, "edges": args.edges, "transport": transport, "channels": channels,
                       "edge_loss": loss, "dtype": dtype, "in_flight": in_flight}
                run_dir = runs / "-".join(str(v) for v in row.values())
                overrides = [f"data.root={args.data}", "data.partition=iid", "data.limit_test=2000",
                             f"train.max_steps={args.steps}", "logging.every_steps=20",
                             "checkpoint.every_steps=100000", f"rpc.activation_dtype={dtype}",
                             f"train.in_flight={in_flight}", f"train.edge_loss={loss}",
                             *([f"rpc.channels={'null' if channels == 'auto' else f'[{channels}]'}"]
                               if transport == "rpc" else []), *args.overrides]
                row["set"] = args.overrides
                job = run_job(net, overrides, run_dir, args.timeout, transport)
                row.update(measure(job, args.warmup, 64, rate))
                rows.append(row)
                print(_line(row), flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"benchmarks/links.py: error: {str(exc).strip().splitlines()[0]} (logs: {runs})", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _line(row: dict) -> str:
    util = row.get("utilisation")
    used = (f" utilisation up {min(util['up']):.0%}-{max(util['up']):.0%} down {min(util['down']):.0%}-"
            f"{max(util['down']):.0%}") if util else ""
    more = "".join(f" {o}" for o in row["set"])
    spent = row.get("cpu_ms_per_sample")
    cpu = f", CPU ms/sample central {spent['central']:.2f} edges {spent['edges']:.2f}" if spent else ""
    return (f"{row['rate']} 1+{row['edges']} {row['transport']} {row['channels']} edge_loss {row['edge_loss']} {row['dtype']} "
            f"in_flight {row['in_flight']}{more}: "
            f"{row['samples_per_s']:.0f} samples/s, accounted B/sample up {row['accounted_bytes_per_sample']['up']:,.0f}"
            f" down {row['accounted_bytes_per_sample']['down']:,.0f}, on the link up "
            f"{row['link_bytes_per_sample']['up']:,.0f} down {row['link_bytes_per_sample']['down']:,.0f}{used}{cpu}")


if __name__ == "__main__":
    sys.exit(main())
