"""Did a code change change training? The eight equivalence runs on two code trees, bit for bit.

A refactor must not change training: the same seed and config give the same run, bit for bit.
The eight runs, plan (single: mnist_cnn cut after pool; alternating: tutorial_cnn edge, central,
edge, central) x train.engine (relay, autograd) x data.placement (central, edge), each a torchrun
job of 1 central + 3 edges on 2,048 MNIST samples for 2 epochs, are made on a baseline revision
(--against) and on the working tree (or a second revision, --tree); per run the final test loss
(exactly), every tensor of model.pt (torch.equal) and summary.json's bytes must be equal.

    python benchmarks/equivalence.py --against bebe1b3
    python benchmarks/equivalence.py --against bebe1b3 --only single-relay-central --timeout 300
    python benchmarks/equivalence.py --against main --tree HEAD         # two revisions
    python benchmarks/equivalence.py --against HEAD --tree HEAD --transports rpc grpc \
        --only single-relay-central single-relay-edge alternating-relay-central alternating-relay-edge

``--transports A B``: each side's topology.transport (default rpc on both): rpc and grpc run as
torchrun jobs, loopback in one process. The autograd runs need rpc or loopback.

A revision is exported (git archive) into a temporary folder and run from there, so that its own
split_trainer is imported. Its results are cached (--cache, keyed on the full commit hash), so
the baseline runs once; the working tree never is. Runs go one after another (10-60 s each on 2
cores). Exit 0 when every run is equal, 1 when one differs or fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SPLIT_TRAINER_MNIST", ROOT.parent / "shared" / "data" / "mnist"))
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "split_trainer_equivalence"
TUTORIAL_PLAN = "[{place: edge, until: pool0}, {place: central, until: pool1}, {place: edge, until: relu2}, {place: central}]"
PLANS = {"single": ["model.name=mnist_cnn", "model.split=pool"],
         "alternating": ["model.name=tutorial_cnn", f"model.plan={TUTORIAL_PLAN}"]}
RUNS = {f"{plan}-{engine}-{placement}": [*keys, f"train.engine={engine}", f"data.placement={placement}"]
        for plan, keys in PLANS.items() for engine in ("relay", "autograd") for placement in ("central", "edge")}
COMMON = ["topology.edges=3", "data.limit_train=2048", "data.limit_test=1000", "train.epochs=2"]
KEPT = ("summary.json", "model.pt")


class Usage(Exception):  # bad usage: said in one line, exit 2
    pass


def resolve(rev: str) -> str:
    """The full commit hash of ``rev``: the cache key, so that a branch that moves is not mistaken for its old self."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise Usage(f"unknown revision {rev!r} in {ROOT}")
    return done.stdout.strip()


def env_for(tree: Path) -> dict[str, str]:
    # Without the launcher's variables of an enclosing torchrun; PYTHONPATH first so the tree's own
    # split_trainer wins over the editable install (whose finder comes after the path entries).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MASTER_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "LOCAL_WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(tree))
    return env


def check_import(tree: Path) -> None:
    """A run of the wrong code would compare a tree with itself and pass: make sure of the import."""
    done = subprocess.run([sys.executable, "-c", "import split_trainer; print(split_trainer.__file__)"], cwd=tree,
                          env=env_for(tree), capture_output=True, text=True, check=True)
    if not Path(done.stdout.strip()).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree} imports split_trainer from {done.stdout.strip()}, not its own")


def end_tree(pid: int) -> None:
    """SIGKILL torchrun, its group and every descendant: torchrun starts each worker in a session of its own."""
    def descendants(p: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
        return [d for c in found for d in (c, *descendants(c))]
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def launch(tree: Path, run_dir: Path, keys: list[str], data: Path, timeout: float, transport: str) -> str | None:
    """One run of ``tree``'s trainer into ``run_dir``; None when it worked, else what went wrong."""
    start = [] if transport == "loopback" else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                                                "--max-restarts=0"]
    cmd = [sys.executable, *start, "-m", "split_trainer", "--config", "configs/mnist.yaml", "--resume", "never",
           "--quiet", "--set", *COMMON, f"data.root={data}", f"output.run_dir={run_dir}",
           *([] if transport == "rpc" else [f"topology.transport={transport}"]), *keys]
    proc = subprocess.Popen(cmd, cwd=tree, env=env_for(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        failure = f"exit {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        end_tree(proc.pid)
        out, _ = proc.communicate()
        failure = f"timed out after {timeout:g} s"
    finally:
        end_tree(proc.pid)  # no rank outlives its run
    if not failure and not all((run_dir / name).is_file() for name in KEPT):
        failure = f"no {' or '.join(KEPT)}"
    if failure:
        print(f"\n--- {run_dir.name} on {tree}: {failure}; the output's end:\n{out[-3000:]}", file=sys.stderr)
    return failure


def run_all(label: str, tree: Path, names: list[str], args: argparse.Namespace, into: Path,
            transport: str) -> dict[str, str | None]:
    """Each named run of ``tree`` into ``into/NAME``, one after another (2 cores: in parallel they would only crowd)."""
    check_import(tree)
    failures = {}
    for name in names:
        started = time.monotonic()
        print(f"{label}: {name} ...", end=" ", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="split_equiv_run_") as run_dir:  # checkpoints and logs go with it
            failures[name] = launch(tree, Path(run_dir), RUNS[name], args.data, args.timeout, transport)
            if not failures[name]:  # copied, then renamed: an interrupted copy never passes for a result
                (partial := into / f"{name}.partial").mkdir(parents=True, exist_ok=True)
                for kept in KEPT:
                    shutil.copy2(Path(run_dir) / kept, partial / kept)
                shutil.rmtree(into / name, ignore_errors=True)
                partial.rename(into / name)
        print(failures[name] or f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return failures


def revision_results(rev: str, names: list[str], args: argparse.Namespace, scratch: Path,
                     transport: str) -> tuple[Path, dict]:
    """A revision's runs on ``transport`` from the cache, running (and caching, each as it ends) those it lacks."""
    commit = resolve(rev)
    cached = args.cache / (commit if transport == "rpc" else f"{commit}-{transport}")
    stamp = f"{commit}\ntorch {torch.__version__}\n{' '.join(COMMON)}\n"
    if (cached / "revision").is_file() and (cached / "revision").read_text() != stamp:
        shutil.rmtree(cached)  # another torch or other settings: those runs need not match these
    cached.mkdir(parents=True, exist_ok=True)
    (cached / "revision").write_text(stamp)
    missing = [n for n in names if not (cached / n).is_dir()]
    if not missing:
        print(f"{rev}: all {len(names)} runs from the cache {cached}", file=sys.stderr)
        return cached, dict.fromkeys(names)
    source = scratch / f"src-{commit[:12]}"
    source.mkdir(exist_ok=True)  # --tree of the same commit comes back here for runs that failed
    subprocess.run(["bash", "-o", "pipefail", "-c", 'git -C "$0" archive "$1" | tar -x -C "$2"', ROOT, commit, source],
                   check=True)
    return cached, {n: None for n in names} | run_all(f"{rev} ({transport})", source, missing, args, cached, transport)


def wire(summary: dict) -> dict:
    """The bytes that training determines: per edge and kind, per cut, totals (not host names, not batch counts)."""
    totals = summary["bytes"]
    edges = {edge: {k: e[k] for k in ("sent", "received", "sent_total", "received_total")}
             for edge, e in totals["per_edge"].items()}
    return {"per_edge": edges, **{k: totals[k] for k in ("per_cut", "sent_total", "received_total", "train_total")}}


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: a difference is named down to the kind of message."""
    flat = {}
    for key, value in tree.items():
        flat.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def tensor_differences(a: Path, b: Path) -> list[str]:
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    if sa.keys() != sb.keys():
        return [f"keys only on one side: {sorted(sa.keys() ^ sb.keys())}"]
    same = {k: sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa}
    return [f"{k} max|diff| {(sa[k].double() - sb[k].double()).abs().max().item():.3g}" if sa[k].shape == sb[k].shape
            else f"{k} shape {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}" for k in sa if not same[k]]


def compare(name: str, a: Path, b: Path) -> bool:
    """Print the run's line (and on stderr what differs); True when loss, tensors and bytes are all equal."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    tensors = tensor_differences(a / "model.pt", b / "model.pt")
    wa, wb = leaves(wire(sa)), leaves(wire(sb))
    loss_equal = float(sa["test_loss"]) == float(sb["test_loss"])
    print(f"{name:28}  test_loss {sa['test_loss']!r}  {sb['test_loss']!r}  tensors {'DIFFER' if tensors else 'equal'}"
          f"  bytes {'equal' if wa == wb else 'DIFFER'}", flush=True)
    for what in tensors + [f"bytes {k}: {wa.get(k)} vs {wb.get(k)}" for k in sorted(wa.keys() | wb.keys())
                          if wa.get(k) != wb.get(k)]:
        print(f"    {name}: {what}", file=sys.stderr)
    return loss_equal and not tensors and wa == wb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, metavar="REV", help="baseline git revision (side A)")
    parser.add_argument("--tree", metavar="REV", help="side B: this revision instead of the working tree")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the MNIST IDX files")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="results of revisions, by commit hash")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(RUNS), help="a subset of: " + ", ".join(RUNS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run (default 600)")
    parser.add_argument("--transports", nargs=2, default=["rpc", "rpc"], metavar=("A", "B"),
                        choices=["rpc", "loopback", "grpc"], help="each side's topology.transport (default rpc rpc)")
    args = parser.parse_args()
    args.data, args.cache = args.data.resolve(), args.cache.resolve()  # the runs' cwd is not ours
    names = args.only or list(RUNS)
    try:
        if not (args.data / "train-images-idx3-ubyte.gz").is_file():
            raise Usage(f"no MNIST at {args.data}: give --data or set SPLIT_TRAINER_MNIST")
        for rev in filter(None, (args.against, args.tree)):
            resolve(rev)  # both, before an hour of runs
        if "grpc" in args.transports and any("autograd" in name for name in names):
            raise Usage("the autograd runs need rpc or loopback: give --only with the relay runs for grpc")
        with tempfile.TemporaryDirectory(prefix="split_equiv_") as scratch:
            on_a, on_b = args.transports
            side_a, failed_a = revision_results(args.against, names, args, Path(scratch), on_a)
            if args.tree:
                side_b, failed_b = revision_results(args.tree, names, args, Path(scratch), on_b)
            else:
                side_b = Path(scratch) / "working-tree"
                failed_b = run_all(f"working tree ({on_b})", ROOT, names, args, side_b, on_b)
            equal = 0
            for name in names:
                if failed_a[name] or failed_b[name]:
                    print(f"{name:28}  FAILED  A: {failed_a[name] or 'ok'}  B: {failed_b[name] or 'ok'}")
                else:
                    equal += compare(name, side_a / name, side_b / name)
    except Usage as exc:
        print(f"equivalence.py: {exc}", file=sys.stderr)
        return 2
    print(f"{equal} of {len(names)} equal")
    return 0 if equal == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
