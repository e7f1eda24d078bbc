"""False alarms of the edge's hijacking check (privacy.hijack_check) over honest runs: every shipped
horizontal config in which the check runs (edge-held data, the loss on the central or a U-shaped
plan), several seeds, on loopback; per run, whether an edge stopped, and the lowest moving label gap
any edge saw, against the threshold.

    python benchmarks/hijack_check.py                      # 3 configs x seeds 1 2 3, 2 epochs each
    python benchmarks/hijack_check.py --seeds 1 --epochs 1 --configs configs/mnist_edge_data.yaml

The shipped configs with central-held data (mnist.yaml, mnist_tutorial.yaml, cifar10.yaml) run no
check: their edges hold no labels, and their central holds the inputs anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from split_trainer.__main__ import main  # noqa: E402
from split_trainer.privacy import scrutiny  # noqa: E402

CONFIGS = ["configs/mnist_edge_data.yaml", "configs/mnist_ushaped.yaml", "configs/mnist_private.yaml"]
LOWEST: dict[str, float] = {}


def _watched(backward):
    def spy(self, grads):
        try:
            backward(self, grads)
        finally:
            if self.average is not None:
                LOWEST[self.name] = min(LOWEST.get(self.name, float("inf")), self.average)
    return spy


def main_(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data", default=os.environ.get("SPLIT_TRAINER_MNIST", str(ROOT.parent / "shared/data/mnist")))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "hijack_check.json")
    args = parser.parse_args(argv)
    scrutiny.GradientCheck.backward = _watched(scrutiny.GradientCheck.backward)
    rows = []
    for config in args.configs:
        for seed in args.seeds:
            LOWEST.clear()
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                code = main(["--config", config, "--set", "topology.transport=loopback", f"train.seed={seed}",
                             f"train.epochs={args.epochs}", f"data.root={args.data}", f"output.run_dir={tmp}",
                             "logging.every_steps=500"])
                summary = json.loads((Path(tmp) / "summary.json").read_text()) if code == 0 else {}
            row = {"config": config, "seed": seed, "epochs": args.epochs, "exit": code,
                   "false_alarm": code != 0, "lowest_label_gap": min(LOWEST.values(), default=None),
                   "per_edge": dict(LOWEST), "test_accuracy": summary.get("test_accuracy"),
                   "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    alarms = sum(r["false_alarm"] for r in rows)
    print(f"{alarms} false alarms in {len(rows)} honest runs; lowest label gap "
          f"{min(r['lowest_label_gap'] for r in rows if r['lowest_label_gap'] is not None):.3f} "
          f"(threshold {scrutiny_threshold()})")
    return 0


def scrutiny_threshold() -> float:
    from split_trainer.config import load_config
    return load_config(None, []).privacy.hijack_check


if __name__ == "__main__":
    sys.exit(main_(sys.argv[1:]))
