"""What survives what. Each fault is a real SIGKILL or SIGSTOP at an exact point of a real
torchrun job (split_trainer.training.faults), on the tutorial's alternating plan (three cuts), under
--max-restarts; the job must finish by itself and end where an untouched run ends."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from split_trainer.records import checkpoint

from conftest import ROOT, TUTORIAL_PLAN, child_env, end_tree, quick_overrides, rank_pid, run, torchrun_cmd

pytestmark = pytest.mark.slow

# 4,096 samples, batch 64: 64 steps; checkpoints at 20, 40, 60, 64; syncs every 10 steps; augmented
# batches (crop_flip), so that every case also checks that a resumed run augments the same way.
KEYS = {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN, "data.limit_train": 4096,
        "data.limit_test": 2000, "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10,
        "train.seed": 3, "data.augment": "crop_flip"}


def _job(mnist: Path, run_dir: Path, fault: str = "", max_restarts: int = 2, **keys) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(3, *quick_overrides(mnist, run_dir, edges=2, **{**KEYS, **keys}), max_restarts=max_restarts)
    return run(cmd, timeout=400, env=child_env(SPLIT_TRAINER_FAULT=fault))


@pytest.fixture(scope="module")
def untouched(mnist_root, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("untouched")
    result = _job(mnist_root, run_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


CASES = {
    "a: edge killed in a training step": ("edge2:train:45:kill", 1, {}),
    "b: edge killed during a replica sync": ("edge1:sync:3:kill", 1, {}),
    "c: edge killed during evaluation": ("edge2:eval:2:kill", 1, {}),
    "d: edge killed while a checkpoint is written": ("edge1:export:2:kill_soon", 1, {}),
    "e: central killed in a training step": ("central:train:30:kill", 1, {}),
    "f: a second failure right after the resume": ("edge1:train:45:kill:0,edge2:train:4:kill:1", 2, {}),
    "g: edge frozen, caught by a small rpc.timeout_s": ("edge2:train:45:stop", 1, {"rpc.timeout_s": 5}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_job_survives_and_ends_like_an_untouched_run(mnist_root, untouched, tmp_path, case):
    fault, restarts, keys = CASES[case]
    result = _job(mnist_root, tmp_path, fault, **keys)
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count("resumed from") == restarts, result.stdout[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == restarts and summary["steps"] == 64
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 64  # every step logged once
    assert abs(summary["test_loss"] - untouched["test_loss"]) < 1e-6
    assert summary["test_accuracy"] == untouched["test_accuracy"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "cancel"])
def test_a_stopped_job_leaves_nothing_behind_and_the_same_command_resumes(mnist_root, tmp_path, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM to torchrun's whole process group."""
    cmd = torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **KEYS), max_restarts=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("checkpoint step 20 saved"):
                break
        ranks = [rank_pid(proc.pid, rank) for rank in range(3)]
        os.killpg(proc.pid, sig)
        started = time.monotonic()
        proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        end_tree(proc.pid)
    assert proc.returncode != 0
    # Every rank ended by itself, sooner than torchrun's 30 s grace before it SIGKILLs one.
    assert stopped_in < 20, stopped_in
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    loaded = checkpoint.find_resumable(tmp_path / "checkpoints", warn=pytest.fail)
    assert loaded is not None and loaded.step >= 20

    again = run(cmd, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {loaded.path}" in again.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 64


def test_a_full_disk_ends_the_job_with_one_line_and_keeps_the_previous_checkpoint(mnist_root, tmp_path):
    # Files 1-3 are step 20's; the 5th is step 40's second file: the write fails with ENOSPC.
    result = _job(mnist_root, tmp_path, "central:checkpoint:5:enospc", max_restarts=0)
    assert result.returncode != 0
    lines = [l for l in result.stdout.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(lines) == 1, result.stdout[-3000:]
    assert f"cannot write checkpoint step 40 into {tmp_path / 'checkpoints'}: No space left on device" in lines[0]
    assert "Traceback" not in result.stdout.split(lines[0])[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000020"]  # no half-written folder
    assert checkpoint.find_resumable(tmp_path / "checkpoints", warn=pytest.fail).step == 20


def test_a_small_timeout_never_fails_a_healthy_job_on_a_loaded_machine(mnist_root, tmp_path):
    """rpc.timeout_s bounds a call's own work: nothing queues behind another call on its edge.
    The full test set in 50 evaluation calls, the default model, and two busy processes competing
    for the cores: if an edge's 25 calls queued, the later ones would wait far past the timeout."""
    load = [subprocess.Popen(["python3", "-c", "while True: pass"]) for _ in range(2)]
    try:
        result = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **{
            "rpc.timeout_s": 5, "train.max_steps": 60, "checkpoint.every_steps": 20, "data.limit_train": "null",
            "data.limit_test": "null", "data.eval_batch_size": 200})), timeout=400)
    finally:
        for proc in load:
            proc.kill()
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["test_accuracy"] > 0.5
    assert sum(e["received"]["eval"] for e in summary["bytes"]["per_edge"].values()) > 0


def test_an_edge_killed_in_edge_placement_resumes_at_its_own_position(mnist_root, tmp_path):
    """Each edge draws from its own Dirichlet shard; after the restart each continues at its own
    position (part of its checkpoint) and the run ends where an untouched one ends."""
    keys = {"model.name": "mnist_cnn", "model.split": "pool", "model.plan": "null", "data.placement": "edge",
            "data.partition": "dirichlet"}
    untouched = _job(mnist_root, tmp_path / "a", **keys)
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    killed = _job(mnist_root, tmp_path / "b", "edge2:train:25:kill", **keys)
    assert killed.returncode == 0, killed.stdout[-4000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert b["restarts"] == 1 and b["resumed_from_step"] in (20, 40) and b["steps"] == a["steps"]
    assert abs(a["test_loss"] - b["test_loss"]) < 1e-6 and a["test_accuracy"] == b["test_accuracy"]
    part = checkpoint.find_resumable(tmp_path / "b" / "checkpoints", warn=pytest.fail).parts["edge2"]["data"]
    shards = json.loads((tmp_path / "b" / "partition.json").read_text())
    assert part["train_samples"] == shards["edge2"]["train"] and part["next_batch"] == shards["edge2"]["train_batches"]
