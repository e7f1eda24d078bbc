"""Shared helpers: the real MNIST files, and real torchrun launches on loopback."""

from __future__ import annotations

import fcntl
import gzip
import itertools
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch

from split_trainer.data.datasets import MNIST_FILES

ROOT = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("SPLIT_TRAINER_MNIST", ROOT.parent / "shared" / "data" / "mnist"))
# The tutorial's own layout of its model: edge, central, edge, central.
TUTORIAL_PLAN = "[{place: edge, until: pool0}, {place: central, until: pool1}, {place: edge, until: relu2}, {place: central}]"


THREADS = int(os.environ.get("SPLIT_TRAINER_TEST_THREADS", "3"))
"""The intra-op threads of every test's own computations and of the equivalence tests' runs
(train.threads in their EXACT settings): the same count on both sides, whatever the machine's
cores or the shell's OMP_NUM_THREADS, so a one-process reference sums in the order the run does."""


DEFAULT_SECONDS = {True: 30, False: 1}
"""What a test without a ``seconds`` mark is taken to last, slow (True) or not."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order a whole-suite run hands tests out in (setup.cfg: ``--dist load --maxschedchunk 1``,
    each worker taking the next test as it runs short): the longest first, so that the short ones
    fill the end and no worker runs alone while the others wait. A run that several tests read is
    made once for all workers (``made_once``), so a test may land on any worker."""
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("seconds")
        return mark.args[0] if mark else DEFAULT_SECONDS[item.get_closest_marker("slow") is not None]

    items.sort(key=lambda item: -seconds(item))  # stable: the rest keep their order


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``name``, filled by ``make(folder)`` once per test session: under pytest-xdist the
    first worker to ask makes it while the others wait on a lock, then all read it (xdist's own
    recipe for a session fixture that runs once). A failed ``make`` leaves it for the next to try."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by its workers
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(autouse=True)
def pinned_threads():
    """Every test computes on ``THREADS`` intra-op threads (and gets the count it had back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_gz() -> Path:
    """The real MNIST folder as shipped: the four IDX files, gzip (read-only in CI)."""
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"real MNIST not found at {MNIST}: set SPLIT_TRAINER_MNIST to the folder of the IDX files")
    return MNIST


@pytest.fixture(scope="session")
def mnist_root(mnist_gz, tmp_path_factory) -> Path:
    """The same files decompressed once per test process into a temporary folder (never beside the
    originals): every run of the suite reads MNIST, and gunzip costs a third of a second a run."""
    root = tmp_path_factory.mktemp("mnist")
    for name in MNIST_FILES:
        with gzip.open(mnist_gz / f"{name}.gz", "rb") as src, open(root / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


@pytest.fixture(scope="session")
def trained_run(mnist_root, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real 1 central + 2 edge run of one epoch on 2,048 samples, shared by the tests that read it
    (evaluated on 1,000 test images: the audit's private images come from them, and its accuracy
    prints in four decimals exactly); made once per session, its console in ``console.txt``."""
    def train(folder: Path) -> None:
        result = run(torchrun_cmd(3, "--config", "configs/mnist.yaml", *quick_overrides(
            mnist_root, folder / "run", edges=2, **{"train.epochs": 1, "data.limit_test": 1000})))
        assert result.returncode == 0, result.stdout[-3000:]
        (folder / "console.txt").write_text(result.stdout)

    folder = made_once(tmp_path_factory, "trained_run", train)
    return folder / "run", subprocess.CompletedProcess([], 0, (folder / "console.txt").read_text())


TORCHRUN_VARS = ("TORCHELASTIC", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(TORCHRUN_VARS)}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def end_tree(pid: int) -> None:
    """SIGKILL a process, its group and every descendant: torchrun starts each worker in a session
    of its own, out of reach of a process-group kill."""
    for target in [pid, *_descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout, kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out[-4000:]}")
    finally:
        end_tree(proc.pid)  # no rank outlives its test
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def torchrun_cmd(nproc: int, *args: str, max_restarts: int = 0) -> list[str]:
    # --standalone: c10d rendezvous on localhost with a free port chosen by torchrun.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "split_trainer", *args]


QUICK_TEST = 256
"""The test images a quick run evaluates on: enough to tell a run that learns from one that does
not, few enough that evaluating costs less than training."""


def quick_overrides(mnist: Path, run_dir: Path, edges: int, **keys: object) -> list[str]:
    """Overrides for a small, fast run on a subset of the real MNIST, on one intra-op thread per rank
    (what a rank of 1 central + 3 edges gets on 2 cores anyway)."""
    base = {"topology.edges": edges, "data.root": mnist, "output.run_dir": run_dir, "data.limit_train": 2048,
            "data.limit_test": QUICK_TEST, "rpc.timeout_s": 60, "logging.every_steps": 5, "train.threads": 1}
    base.update(keys)
    return ["--set", *(f"{k}={v}" for k, v in base.items())]


def loopback_overrides(mnist: Path, run_dir: Path, edges: int, **keys: object) -> list[str]:
    """quick_overrides with the whole fleet in one process (topology.transport=loopback): the run a
    torchrun job of the same config makes (test_loopback's slow test holds the two to 1e-6), for
    what need not pay for a rank per edge (each rank's start costs seconds of imports)."""
    return quick_overrides(mnist, run_dir, edges, **{"topology.transport": "loopback", **keys})


def loopback_cmd(mnist: Path, run_dir: Path, edges: int, *args: str, **keys: object) -> list[str]:
    """``python -m split_trainer ARGS`` with loopback_overrides, for a run in a process of its own."""
    return [sys.executable, "-m", "split_trainer", *args, *loopback_overrides(mnist, run_dir, edges, **keys)]


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker that torchrun started with RANK=rank."""
    children = [c for task in Path(f"/proc/{torchrun_pid}/task").iterdir() for c in (task / "children").read_text().split()]
    for child in children:
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun_pid}")


def run_and_kill(cmd: list[str], after_line: str, rank: int, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Start torchrun, send ``sig`` to the worker of ``rank`` once a line starts with ``after_line``."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(after_line):
                os.kill(rank_pid(proc.pid, rank), sig)
                break
        out, _ = proc.communicate(timeout=300)  # a hang fails here
    finally:
        end_tree(proc.pid)
    return proc.returncode, "".join(lines) + out


def free_port() -> int:
    """A free port for a listener a test starts by its own number (a torchrun host's rendezvous),
    taken below the kernel's ephemeral range. Its clients dial it before it listens; an ephemeral
    number could by then belong to another test's TensorPipe listener (each rank binds about 18 with
    port 0), and TensorPipe aborts its whole process (std::bad_alloc) on bytes not its own. A machine
    whose ephemeral range leaves no room below it gets a port-0 one, as before."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    below = range(10000, first_ephemeral) if first_ephemeral > 11000 else range(0)  # else: none to take
    rng = random.SystemRandom()
    for port in [rng.choice(below) for _ in range(100) if below] + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def launch(script: str, *args: str, within: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
    """A host started by one of the launch scripts, in a session of its own (``within``: a command
    prefix, such as own_loopback's)."""
    return subprocess.Popen([*within, "bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def own_loopback():
    """A command prefix that runs a host in a network namespace of this test's own, with only a
    loopback interface (give its hosts IFNAME=lo). An elastic round leaves torch to pick its store's
    port (free now, listened on seconds later, when the worker has started) and the other ranks
    dial it meanwhile: on the shared loopback that port may by then be another test's TensorPipe
    listener, which aborts on a stranger's bytes. Here nothing else listens. Without root or
    iproute2: the shared loopback (an empty prefix)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield ()
        return
    name = f"stlo{os.getpid()}x{next(_NAMESPACES)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield ("ip", "netns", "exec", name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


_NAMESPACES = itertools.count()


class Lines:
    """A process's output, line by line as it comes (read on a thread of its own), and all of it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, wanted: Callable[[str], bool], timeout: float) -> str:
        """The first line (from here on) that ``wanted`` accepts; fails when the output ends first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no such line in {timeout} s; the output so far:\n{''.join(self.seen)[-4000:]}")
            if line is None:
                pytest.fail(f"the output ended first:\n{''.join(self.seen)[-4000:]}")
            self.seen.append(line)
            if wanted(line):
                return line

    def rest(self, timeout: float) -> str:
        """Everything, once the process has ended (killed, with its tree, after ``timeout`` s)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_tree(self.proc.pid)
            pytest.fail(f"still running after {timeout} s:\n{''.join(self.seen)[-4000:]}")
        while (line := self.lines.get(timeout=30)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def run_in_process(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``python -m split_trainer ARGV`` as ``main(argv)`` in this process: (exit code, stdout,
    stderr) of this call alone. main() sets the torch thread count and a SIGTERM handler: both are
    put back after. argparse's refusals raise SystemExit, which the interpreter would turn into
    the exit code: so is it here. Use it through the ``in_process`` fixture, which also gives the
    call the environment and working directory a child process would have."""
    from split_trainer.__main__ import main

    capsys.readouterr()  # what came before is not this call's
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGTERM)
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_process(capsys, monkeypatch) -> Callable[..., tuple[int, str, str]]:
    """``in_process(*argv) -> (code, out, err)``: run_in_process, from the repository root, without
    torchrun's variables or an armed fault, as ``run`` starts a child (``child_env``); whatever
    main() sets in os.environ is undone after the test."""
    monkeypatch.chdir(ROOT)
    for key in list(os.environ):
        if key.startswith(TORCHRUN_VARS) or key == "SPLIT_TRAINER_FAULT":
            monkeypatch.delenv(key)
    # main() setdefault()s it; setting it here first (to the same value) makes monkeypatch undo it
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", os.environ.get("TORCH_CPP_LOG_LEVEL", "FATAL"))
    return lambda *argv: run_in_process(capsys, *argv)


@pytest.fixture
def loopback(in_process, mnist_root):
    """``loopback(run_dir, edges, *argv, **keys)``: one run in this process; its summary."""
    def train(run_dir: Path, edges: int, *argv: str, **keys) -> dict:
        code, out, err = in_process(*argv, *loopback_overrides(mnist_root, run_dir, edges, **keys))
        assert code == 0, (out + err)[-3000:]
        return json.loads((run_dir / "summary.json").read_text())
    return train
