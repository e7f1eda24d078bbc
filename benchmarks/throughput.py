"""Split training against local training, on the same batches, side by side.

    python benchmarks/throughput.py                      # local and split 1+1, 1+3 on the CPU, 3 repeats
    python benchmarks/throughput.py --edges 1 3 7        # the edge counts to run
    python benchmarks/throughput.py --smoke              # a quick check that every path works
    python benchmarks/throughput.py --edges 3 --no-local --transport grpc   # gRPC + mutual TLS

Measures local single-process training of the same model with the whole thread budget (all
cores), then split training 1+N for each ``--edges`` count through the real torchrun path, with
the default thread split; warm-up steps are excluded and each figure is the median of the
repeats. When CUDA is present it adds local training on the GPU (batch 64 and 512) and split runs
with every segment on the GPU (``--device`` picks where the main rows run). Prints a table and
writes it as JSON with a description of the machine: samples/s, split/local ratio, wire bytes per
training sample, peak resident memory per rank, and (full mode) how much each rank's memory grew
between step 500 and step 2,000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


def local_worker(data: str, steps: int, warmup: int, threads: int, batch: int, device: str) -> None:
    """One local measurement, in a fresh process like every rank of a split run."""
    import torch

    from split_trainer.config import load_config
    from split_trainer.data.datasets import load
    from split_trainer.training.local import train_local

    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"data.root={data}", f"data.batch_size={batch}"])
    train, _, _ = load(cfg.data)
    train_local(cfg, train, steps=warmup, device=device)  # warm-up, then the same batches continue
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    train_local(cfg, train, steps=steps, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    print(json.dumps({"samples_per_s": steps * batch / elapsed,
                      "peak_rss_mb": {"local": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))


def run_local(args: argparse.Namespace, device: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--local-worker", "--data", str(args.data), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(batch), "--threads", str(args.threads), "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_split(args: argparse.Namespace, edges: int, steps: int, device: str) -> dict:
    """A real torchrun job; throughput from its per-window step timings after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="split_bench_") as run_dir:
        overrides = [f"topology.edges={edges}", f"data.root={args.data}", f"output.run_dir={run_dir}",
                     f"train.max_steps={args.warmup + steps}", f"data.batch_size={args.batch}",
                     f"logging.every_steps={args.window}", "data.limit_test=1000", f"train.engine={args.engine}",
                     f"train.central_device={device}", f"train.edge_device={device}",
                     *(["topology.transport=grpc"] if args.transport == "grpc" else [f"rpc.transport={args.transport}"])]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={edges + 1}",
               "-m", "split_trainer", "--config", str(ROOT / "configs" / "mnist.yaml"), "--quiet", "--set", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        summary = json.loads(Path(run_dir, "summary.json").read_text())
    windows = [r for r in records if "loss" in r and r["step"] > args.warmup]
    samples = args.window * args.batch * len(windows)
    seconds = sum(args.window * args.batch / r["samples_per_s"] for r in windows)
    ranks = windows[-1]["rss_mb"]
    result = {"samples_per_s": samples / seconds, "bytes_per_sample": summary["bytes"]["per_train_sample"],
              "peak_rss_mb": {rank: max(r["rss_mb"][rank] for r in records if "rss_mb" in r) for rank in ranks}}
    at = {r["step"]: r["rss_mb"] for r in records if "rss_mb" in r}
    if 500 in at and 2000 in at:
        result["rss_growth_500_to_2000"] = {k: at[2000][k] / at[500][k] - 1 for k in at[500]}
    return result


def median_of(runs: list[dict]) -> dict:
    best = dict(runs[0])
    best["samples_per_s"] = statistics.median(r["samples_per_s"] for r in runs)
    best["repeats"] = [round(r["samples_per_s"], 1) for r in runs]
    return best


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "arch": platform.machine(), "gpus": gpus,
            "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the MNIST IDX files")
    parser.add_argument("--edges", type=int, nargs="+", default=[1, 3], help="edge counts of the split runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the main rows compute")
    parser.add_argument("--steps", type=int, default=600, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=100, help="steps before the measurement starts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=50, help="steps per timing window")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="local thread budget")
    parser.add_argument("--engine", default="relay", choices=["relay", "autograd"])
    parser.add_argument("--transport", default="tcp", choices=["tcp", "auto", "grpc"],
                        help="rpc.transport of the split runs (tcp, auto), or grpc: topology.transport=grpc")
    parser.add_argument("--no-local", action="store_true", help="skip the local rows (the ratio is then to nothing)")
    parser.add_argument("--memory-steps", type=int, default=2000, help="1+3 run for the memory check (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark" / "throughput.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark works")
    parser.add_argument("--local-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_worker:
        return local_worker(str(args.data), args.steps, args.warmup, args.threads, args.batch, args.device)
    if args.smoke:
        args.steps, args.warmup, args.repeats, args.window, args.memory_steps = 20, 10, 1, 10, 0
    info = machine()

    rows = {} if args.no_local else {"local": median_of([run_local(args, args.device, args.batch)
                                                        for _ in range(args.repeats)])}
    for edges in args.edges:
        rows[f"split 1+{edges}"] = median_of([run_split(args, edges, args.steps, args.device)
                                             for _ in range(args.repeats)])
    if info["gpus"] and args.device == "cpu":
        for batch in (64, 512):
            rows[f"local, GPU, batch {batch}"] = median_of([run_local(args, "cuda", batch)])
        for edges in args.edges:
            rows[f"split 1+{edges}, GPU"] = median_of([run_split(args, edges, args.steps, "cuda")])
    if args.memory_steps and 3 in args.edges:
        rows["split 1+3"]["rss_growth_500_to_2000"] = run_split(args, 3, args.memory_steps,
                                                                args.device)["rss_growth_500_to_2000"]

    local = rows["local"]["samples_per_s"] if "local" in rows else float("nan")
    print(f"{'run':<24} {'samples/s':>10} {'x local':>8} {'bytes/sample':>13}  peak RSS MB per rank")
    for name, row in rows.items():
        row["ratio_to_local"] = row["samples_per_s"] / local
        rss = " ".join(f"{k}={v:.0f}" for k, v in row["peak_rss_mb"].items())
        print(f"{name:<24} {row['samples_per_s']:>10.0f} {row['ratio_to_local']:>8.2f} "
              f"{row.get('bytes_per_sample', 0):>13,.0f}  {rss}")
    if "rss_growth_500_to_2000" in rows.get("split 1+3", {}):
        growth = ", ".join(f"{k} {v:+.1%}" for k, v in rows["split 1+3"]["rss_growth_500_to_2000"].items())
        print(f"memory growth, 1+3, step 500 -> 2000: {growth}")
    report = {"machine": info, "engine": args.engine, "transport": args.transport, "device": args.device,
              "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
