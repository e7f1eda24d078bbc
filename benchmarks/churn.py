"""Churn: a live fleet (topology.membership: live) whose edges die and come back while it trains.

    python benchmarks/churn.py                              # 1+32, 600 steps, an edge killed every 10 s
    python benchmarks/churn.py --edges 32 --steps 600 --every 10 --seed 1
    python benchmarks/churn.py --edges 3 --steps 0 --every 120 --kills 1    # the default run, one kill at 120 s

Runs the same job twice on the grpc transport, the central in a process of its own: untouched,
then with churn. The edges run in this process, each on a thread with its own certificate and
stream (as ``python -m split_trainer edges`` runs them). Every ``--every`` seconds a randomly
chosen edge (seeded) is killed: its stream is closed under it, mid-call, as a crashed host's
would be, and everything it held is lost; it is started again at once, a new edge object that
dials again and joins at the next flush. Reports samples/s of both runs, the leaves and joins, the
batches given back, whether every step was trained exactly once, and the final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(ROOT))

from split_trainer.config import load_config  # noqa: E402
from split_trainer.training.hosting import EdgeHost  # noqa: E402
from split_trainer.transport import grpc_edge, identity  # noqa: E402
from split_trainer.transport.grpc_common import read_address  # noqa: E402

CHANNELS: dict[str, grpc.Channel] = {}
_secure_channel = grpc.secure_channel


def _recorded_channel(*args, **kwargs):
    """grpc.secure_channel, remembered by the thread (the edge) that opened it: the kill's handle."""
    channel = _secure_channel(*args, **kwargs)
    CHANNELS[threading.current_thread().name] = channel
    return channel


grpc.secure_channel = _recorded_channel


def run(args: argparse.Namespace, churn: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="split_churn_") as run_dir:
        keys = [f"topology.edges={args.edges}", "topology.transport=grpc", "topology.membership=live",
                "topology.min_edges=1", "train.dispatch=free_first", f"data.root={args.data}",
                f"output.run_dir={run_dir}", f"train.max_steps={args.steps or 'null'}", "logging.every_steps=1",
                "rpc.timeout_s=30", "rpc.startup_timeout_s=300", "checkpoint.every_steps=200", *args.overrides]
        config = str(ROOT / "configs" / "mnist.yaml")
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        central = subprocess.Popen([sys.executable, "-m", "split_trainer", "--config", config, "--quiet", "--set",
                                    *keys], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        own = load_config(config, keys)
        address = read_address(Path(run_dir), 300)
        ended, kills = threading.Event(), []

        def edge(k: int) -> None:
            bundle = identity.load_bundle(Path(run_dir) / "certs" / f"edge{k}")
            while not ended.is_set():  # a killed edge starts again at once: a new process would
                try:
                    grpc_edge.serve_edge_grpc(lambda: address, bundle, EdgeHost(own, [k]), own)
                    return  # the job is done
                except Exception:  # killed (or refused while the central has not yet seen the old stream end)
                    ended.wait(0.2)

        threads = [threading.Thread(target=edge, args=(k,), name=f"edge{k}", daemon=True)
                   for k in range(1, args.edges + 1)]
        for thread in threads:
            thread.start()
        chooser = random.Random(args.seed)
        while churn and central.poll() is None and len(kills) < args.kills:
            try:
                central.wait(args.every)
            except subprocess.TimeoutExpired:
                victim = f"edge{chooser.randint(1, args.edges)}"
                if victim in CHANNELS:
                    CHANNELS[victim].close()  # mid-call: what it held is gone, as a crashed host's
                kills.append(victim)
        code = central.wait()
        ended.set()
        if code:
            raise SystemExit(f"the central failed: {central.stderr.read().decode()[-2000:]}")
        summary = json.loads(Path(run_dir, "summary.json").read_text())
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["step"] for r in records if "loss" in r)
    changes = [r for r in records if r.get("event") == "membership" and r["step"] > 0]
    return {"churn": churn, "samples_per_s": round(summary["samples_per_s"]), "test_accuracy": summary["test_accuracy"],
            "kills": len(kills), "left": sum(len(r["left"]) for r in changes),
            "joined": sum(len(r["joined"]) for r in changes), "requeued": sum(r.get("requeued", 0) for r in changes),
            "every_step_once": steps == list(range(1, summary["steps"] + 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600, help="0: the config's whole run (6 epochs)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--kills", type=int, default=10**9, help="the most kills (default: no limit)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SPLIT_TRAINER_MNIST", DEFAULT_DATA)))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark" / "churn.json")
    args = parser.parse_args()
    rows = [run(args, churn=False), run(args, churn=True)]
    print("| run | samples/s | kills | left / joined | batches given back | every step once | test accuracy |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: |")
    for r in rows:
        print(f"| {'churn, a kill every ' + format(args.every, 'g') + ' s' if r['churn'] else 'untouched'} "
              f"| {r['samples_per_s']} | {r['kills']} | {r['left']} / {r['joined']} | {r['requeued']} "
              f"| {r['every_step_once']} | {100 * r['test_accuracy']:.2f} % |")
    print(f"churn keeps {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f} of the untouched samples/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"edges": args.edges, "steps": args.steps, "every_s": args.every, "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
