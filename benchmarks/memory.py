"""Resident memory of every rank over a whole run, from the run's own metrics.jsonl.

    python benchmarks/memory.py runs/mnist            # after any run (the default one: 5,628 steps)

Every metrics line carries each rank's RSS (``rss_mb``, sampled every ``logging.every_steps``).
The run is cut in thirds by step; the check is that the largest value in the last third is at
most 10 % above the largest in the first third, after a warm-up (default: the first 5 % of steps,
when allocators and RPC buffers are still growing). Prints a table and exits 1 when a rank fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summarise(records: list[dict], warmup: float) -> dict[str, dict[str, float]]:
    samples = [r for r in records if "rss_mb" in r]
    last_step = max(r["step"] for r in samples)
    start = warmup * last_step
    thirds = [start + (last_step - start) * k / 3 for k in (1, 2)]
    result = {}
    for rank in samples[0]["rss_mb"]:
        first = [r["rss_mb"][rank] for r in samples if start < r["step"] <= thirds[0]]
        middle = [r["rss_mb"][rank] for r in samples if thirds[0] < r["step"] <= thirds[1]]
        last = [r["rss_mb"][rank] for r in samples if r["step"] > thirds[1]]
        result[rank] = {"first_third_max_mb": max(first), "middle_third_max_mb": max(middle),
                        "last_third_max_mb": max(last), "min_mb": min(first + middle + last),
                        "growth": max(last) / max(first) - 1}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps left out at the start")
    parser.add_argument("--limit", type=float, default=0.10, help="largest allowed growth, last third vs first")
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    table = summarise(records, args.warmup)
    print(f"{'rank':<8} {'min MB':>8} {'max 1st third':>14} {'max 2nd third':>14} {'max 3rd third':>14} {'growth':>8}")
    for rank, row in table.items():
        print(f"{rank:<8} {row['min_mb']:>8.0f} {row['first_third_max_mb']:>14.0f} {row['middle_third_max_mb']:>14.0f} "
              f"{row['last_third_max_mb']:>14.0f} {row['growth']:>+8.1%}")
    failed = [rank for rank, row in table.items() if row["growth"] > args.limit]
    print("ok: every rank within" if not failed else f"over the limit: {', '.join(failed)};", f"{args.limit:.0%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
