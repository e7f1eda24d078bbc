"""Many edges on one machine: what grows with the number of edges N, and accuracy at the same steps.

    python benchmarks/many_edges.py                          # 1+3, 8, 32, 128, 256 on loopback, 300 steps each
    python benchmarks/many_edges.py --edges 3 128 --set train.edges_per_sync=0   # every edge in every sync
    python benchmarks/many_edges.py --transport grpc --edges 8 32 128             # the central in a process of its
                                                                                  # own, the edges in another

Each row is one run of configs/mnist.yaml (central-held data, the real MNIST), ``--steps`` steps
with a checkpoint every ``--checkpoint-every``: test accuracy at the end, samples/s, the time of a
step without the syncs, the mean replica sync and checkpoint, and peak RSS. On loopback the central
and every edge share one process, so a step's time holds the edges' compute and the RSS every
replica. On grpc the central runs alone and the edges dial it from one ``python -m split_trainer
edges`` process, each with its own certificate and stream: the central's CPU time per step and its
own RSS are then what the central pays for N edges. Writes the table to
runs/benchmark/many_edges.json and a plot of per-step time and sync time against N beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


def _start(args: list[str], config: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "split_trainer", *args, "--config", str(ROOT / "configs" / "mnist.yaml"), "--quiet",
           "--set", *config]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _ended(child: subprocess.Popen, what: str):
    """This child's own resource usage (peak RSS, CPU), not the largest of every child so far."""
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{what} failed: {child.stderr.read().decode()[-2000:]}")
    return usage


def run(args: argparse.Namespace, edges: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="split_many_") as run_dir:
        config = [f"topology.edges={edges}", f"topology.transport={args.transport}", f"data.root={args.data}",
                  f"output.run_dir={run_dir}", f"train.max_steps={args.steps}", "rpc.startup_timeout_s=600",
                  f"checkpoint.every_steps={args.checkpoint_every}", *args.overrides]
        central = _start([], config)
        if args.transport == "grpc":  # the central alone makes the job's certificates and listens
            from split_trainer.transport.grpc_common import read_address

            fleet = _start(["edges", "--central", read_address(Path(run_dir), 600), "--certs",
                            str(Path(run_dir, "certs")), "--count", str(edges)], config)
        usage = _ended(central, f"1+{edges}")
        if args.transport == "grpc":
            _ended(fleet, f"the {edges} edges")
        summary = json.loads(Path(run_dir, "summary.json").read_text())
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    saves = [r["seconds"] for r in records if r.get("event") == "checkpoint"]
    return {"edges": edges, "test_accuracy": summary["test_accuracy"], "samples_per_s": round(summary["samples_per_s"]),
            "step_ms": round(1000 * (summary["train_time_s"] - summary["sync_time_s"]) / summary["steps"], 2),
            "central_cpu_ms_per_step": round(1000 * (summary["train_cpu_s"] - summary["sync_cpu_s"]) / summary["steps"], 2),
            "central_cpu_ms_per_sync": round(1000 * summary["sync_cpu_s"] / max(summary["syncs"], 1), 2),
            "sync_ms": round(1000 * summary["sync_time_s"] / max(summary["syncs"], 1), 2),
            "checkpoint_s": round(sum(saves) / max(len(saves), 1), 3), "peak_rss_mb": usage.ru_maxrss // 1024}


def plot(rows: list[dict], path: Path) -> None:
    """Two panels, per-step time and sync time against N (log scale), drawn with PIL."""
    from math import log2

    from PIL import Image, ImageDraw

    width, height, pad = 420, 300, 50
    canvas = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(canvas)
    xs = [log2(r["edges"]) for r in rows]
    for panel, (key, title) in enumerate((("central_cpu_ms_per_step", "central CPU ms per step (syncs excluded)"),
                                          ("sync_ms", "ms per sync"))):
        left, top, right, bottom = panel * width + pad, 30, (panel + 1) * width - pad, height - pad
        ys, most = [r[key] for r in rows], max(r[key] for r in rows) * 1.1 or 1.0
        draw.text((left, 8), title, fill="black")
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        span = (max(xs) - min(xs)) or 1.0
        points = [(left + (x - min(xs)) / span * (right - left), bottom - y / most * (bottom - top)) for x, y in zip(xs, ys)]
        draw.line(points, fill="navy", width=2)
        for (px, py), row, y in zip(points, rows, ys):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill="navy")
            draw.text((px - 8, bottom + 6), str(row["edges"]), fill="black")
            draw.text((px + 5, py - 14), f"{y:g}", fill="black")
        draw.text((left, bottom + 24), "edges N (log scale)", fill="black")
        draw.text((left - 45, top), f"{most:.0f}", fill="black")
        draw.text((left - 12, bottom - 10), "0", fill="black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, nargs="+", default=[3, 8, 32, 128, 256])
    parser.add_argument("--transport", choices=["loopback", "grpc"], default="loopback")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("SPLIT_TRAINER_MNIST", DEFAULT_DATA)))
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark" / "many_edges.json")
    args = parser.parse_args()
    rows = []
    print("| 1+N | test accuracy | samples/s | ms per step | central CPU ms per step | ms per sync | central CPU ms per "
          "sync | s per checkpoint | central peak RSS MB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for edges in args.edges:
        rows.append(run(args, edges))
        r = rows[-1]
        print(f"| 1+{edges} | {100 * r['test_accuracy']:.2f} % | {r['samples_per_s']} | {r['step_ms']} "
              f"| {r['central_cpu_ms_per_step']} | {r['sync_ms']} | {r['central_cpu_ms_per_sync']} "
              f"| {r['checkpoint_s']} | {r['peak_rss_mb']:,} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"transport": args.transport, "steps": args.steps, "overrides": args.overrides,
                                    "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
