"""The throughput benchmark in its smoke mode: every path runs and the report is complete (no timing asserted)."""

import json
import sys

import pytest

from conftest import run

pytestmark = pytest.mark.slow


@pytest.mark.seconds(75)
def test_benchmark_smoke(mnist_root, tmp_path):
    out = tmp_path / "bench.json"
    # One split row, the smallest: 1+1 and 1+3 run the same code (each rank costs seconds of start-up).
    result = run([sys.executable, "benchmarks/throughput.py", "--smoke", "--edges", "1", "--data", str(mnist_root),
                  "--out", str(out)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"local", "split 1+1"}
    for name, row in report["rows"].items():
        assert row["samples_per_s"] > 0 and row["ratio_to_local"] > 0, name
    assert set(report["rows"]["split 1+1"]["peak_rss_mb"]) == {"central", "edge1"}
    assert report["machine"]["cores"] >= 1 and "torch" in report["machine"]
    assert report["rows"]["split 1+1"]["bytes_per_sample"] > 2 * 64 * 12 * 12 * 4
    assert "x local" in result.stdout
