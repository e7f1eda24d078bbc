"""A live fleet (topology.membership: live) on the grpc transport, with real processes: the
central alone (its certificates made in the run folder) and three edges that dial it with
``python -m split_trainer edge``. One edge dies and is started again, another freezes and is
continued; nothing else restarts, and every batch is trained exactly once."""

import json
import signal
import subprocess
import sys

import pytest

from split_trainer.transport.grpc_common import read_address

from conftest import ROOT, Lines, child_env, end_tree, quick_overrides

pytestmark = pytest.mark.slow

LIVE = {"topology.transport": "grpc", "topology.membership": "live", "topology.min_edges": 1,
        "train.dispatch": "free_first", "train.engine": "relay", "data.limit_train": 4096, "train.epochs": 3,
        "train.edge_sync_every": 8, "checkpoint.every_steps": 64, "logging.every_steps": 1, "rpc.timeout_s": 8,
        "rpc.startup_timeout_s": 60}
TOTAL = 3 * 64


def _edge(run_dir, k, overrides, fault=""):
    cmd = [sys.executable, "-m", "split_trainer", "edge", "--central", read_address(run_dir, 60),
           "--certs", str(run_dir / "certs" / f"edge{k}"), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(SPLIT_TRAINER_FAULT=fault), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _is_change(name, what):
    return lambda line: line.startswith("membership: ") and f"{name} {what} at step" in line


@pytest.mark.seconds(150)
def test_an_edge_that_dies_or_freezes_leaves_and_rejoins_while_the_others_train(mnist_root, tmp_path):
    overrides = quick_overrides(mnist_root, tmp_path, 3, **LIVE)
    central = subprocess.Popen([sys.executable, "-m", "split_trainer", *overrides], cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # edge2 dies at its 12th training batch (SIGKILL); edge3 freezes at its 40th (SIGSTOP) until continued.
    edges = {1: _edge(tmp_path, 1, overrides), 2: _edge(tmp_path, 2, overrides, "edge2:train:12:kill"),
             3: _edge(tmp_path, 3, overrides, "edge3:train:40:stop")}
    lines = Lines(central)
    try:
        left = lines.wait_for(_is_change("edge2", "left"), 120)
        assert edges[2].wait(30) == -signal.SIGKILL
        edges[2] = _edge(tmp_path, 2, overrides)  # the same command again, without the fault
        lines.wait_for(_is_change("edge2", "joined"), 120)
        frozen = lines.wait_for(_is_change("edge3", "left"), 120)
        edges[3].send_signal(signal.SIGCONT)
        lines.wait_for(_is_change("edge3", "joined"), 120)
        out = lines.rest(180)
        assert central.returncode == 0, out[-4000:]
        assert [edge.wait(60) for edge in edges.values()] == [0, 0, 0]
    finally:
        for proc in (central, *edges.values()):
            end_tree(proc.pid)
    assert "given back to the others" in left, left
    assert "fell silent" in frozen or "ran for more than" in frozen, frozen
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert sorted(steps) == list(range(1, TOTAL + 1)), steps  # every batch once: none lost, none twice
    changes = [r for r in records if r.get("event") == "membership" and r["step"] > 0]
    left, joined = ({name: r["step"] for r in changes for name in r[what]} for what in ("left", "joined"))
    assert sorted(left) == sorted(joined) == ["edge2", "edge3"], changes  # each once, in either order
    assert left["edge2"] < joined["edge2"] and left["edge3"] < joined["edge3"], changes
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == TOTAL and summary["restarts"] == 0 and summary["edges"] == 3
    assert summary["test_accuracy"] > 0.8

