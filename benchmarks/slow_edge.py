"""One slow edge: round robin against free_first (train.dispatch), 1 central + N edges.

    python benchmarks/slow_edge.py                        # 1+3, edge3 slowed, 400 steps, 2 repeats
    python benchmarks/slow_edge.py --edges 3 --steps 400 --repeats 3 --slow-ms 100

The slow edge spends ``--slow-ms`` more on every training call (the ``slow`` fault of
split_trainer.training.faults: a slower device, which on a machine of few cores is the one way to slow one
edge without slowing every rank that shares its cores). Each row is a real torchrun job on the
full MNIST training set: samples/s after the warm-up (median of the repeats), the batches each
edge took, and the test accuracy at the end. Writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


def run(args: argparse.Namespace, mode: str, slow: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="split_slow_") as run_dir:
        overrides = [f"topology.edges={args.edges}", f"data.root={args.data}", f"output.run_dir={run_dir}",
                     f"train.max_steps={args.warmup + args.steps}", f"logging.every_steps={args.window}",
                     f"train.dispatch={mode}", "checkpoint.every_steps=100000"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.edges + 1}",
               "-m", "split_trainer", "--config", str(ROOT / "configs" / "mnist.yaml"), "--quiet", "--set", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
               "SPLIT_TRAINER_FAULT": f"edge{args.edges}:train:1:slow" if slow else ""}
        env["SPLIT_TRAINER_SLOW_MS"] = str(args.slow_ms)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        summary = json.loads(Path(run_dir, "summary.json").read_text())
    windows = [r for r in records if "loss" in r and r["step"] > args.warmup]
    seconds = sum(args.window * 64 / r["samples_per_s"] for r in windows)
    return {"samples_per_s": args.window * 64 * len(windows) / seconds, "test_accuracy": summary["test_accuracy"],
            "batches": {name: e["batches"] for name, e in summary["bytes"]["per_edge"].items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400, help="measured steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slow-ms", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark" / "slow_edge.json")
    args = parser.parse_args()
    rows = []
    for slow in (False, True):
        for mode in ("round_robin", "free_first"):
            runs = [run(args, mode, slow) for _ in range(args.repeats)]
            row = {"mode": mode, "slow_edge": f"edge{args.edges} +{args.slow_ms} ms/call" if slow else "none",
                   "samples_per_s": statistics.median(r["samples_per_s"] for r in runs),
                   "repeats": [round(r["samples_per_s"], 1) for r in runs],
                   "test_accuracy": runs[-1]["test_accuracy"], "batches": runs[-1]["batches"]}
            rows.append(row)
            print(f"{row['mode']:<12} slow {row['slow_edge']:<22} {row['samples_per_s']:7.1f} samples/s "
                  f"{row['repeats']}  accuracy {row['test_accuracy']:.4f}  batches {row['batches']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"edges": args.edges, "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
