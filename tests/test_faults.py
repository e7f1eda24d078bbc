"""What survives what (docs/checkpoints-and-faults.md, the table names each test). Each fault is a
real SIGKILL or SIGSTOP at an exact point of a real torchrun job (split_trainer.training.faults), on
the tutorial's alternating plan (three cuts), under --max-restarts; the job must finish by itself
and end where an untouched run ends: the same parameters (1e-6), test loss (1e-6) and accuracy.
The untouched run is the same config in one process (loopback), the run torchrun's would be."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from split_trainer.records import checkpoint

from conftest import (ROOT, TUTORIAL_PLAN, Lines, child_env, end_tree, loopback_cmd, quick_overrides, rank_pid, run,
                      torchrun_cmd)

pytestmark = pytest.mark.slow

# 4,096 samples, batch 64: 64 steps; checkpoints at 20, 40, 60, 64; syncs every 10 steps; augmented
# batches (crop_flip), so that every case also checks that a resumed run augments the same way.
KEYS = {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN, "data.limit_train": 4096,
        "data.limit_test": 2000, "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10,
        "train.seed": 3, "data.augment": "crop_flip"}


def _job(mnist: Path, run_dir: Path, fault: str = "", *args: str, max_restarts: int = 2,
         **keys) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(3, *args, *quick_overrides(mnist, run_dir, edges=2, **{**KEYS, **keys}),
                       max_restarts=max_restarts)
    return run(cmd, timeout=400, env=child_env(SPLIT_TRAINER_FAULT=fault))


@pytest.fixture(scope="module")
def untouched(mnist_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("untouched")
    result = run(loopback_cmd(mnist_root, run_dir, 2, **KEYS))
    assert result.returncode == 0, result.stdout[-3000:]
    return run_dir


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _ends_like(run_dir: Path, untouched: Path) -> dict:
    """``run_dir``'s run ended where the untouched one did, every step logged once; its summary."""
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (run_dir, untouched))
    assert summary["steps"] == 64
    steps = [r["step"] for r in _records(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 64  # every step logged once
    assert abs(summary["test_loss"] - reference["test_loss"]) < 1e-6
    assert summary["test_accuracy"] == reference["test_accuracy"]
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (untouched, run_dir))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    return summary


# Started over (--resume never) in a copy of the finished untouched run's folder: the restart must
# take this job's own newest checkpoint, not the finished run's step 64.
OVER_A_FINISHED_RUN = ("--resume", "never")

CASES = {  # fault, restarts, the step the (first) resume must come from (None: whichever), keys, arguments
    "a: edge killed in a training step, over a finished run": ("edge2:train:45:kill", 1, 20, {},
                                                               OVER_A_FINISHED_RUN),
    "b: edge killed during a replica sync": ("edge1:sync:3:kill", 1, None, {}, ()),
    "c: edge killed during evaluation": ("edge2:eval:2:kill", 1, None, {}, ()),
    # The step-40 checkpoint is being gathered when edge1 dies in its call: it never lands.
    "d: edge killed while a checkpoint is gathered": ("edge1:export:2:kill", 1, 20, {}, ()),
    "e: central killed in a training step": ("central:train:30:kill", 1, None, {}, ()),
    "f: a second failure right after the resume": ("edge1:train:45:kill:0,edge2:train:4:kill:1", 2, None, {}, ()),
    "g: edge frozen, caught by a small rpc.timeout_s": ("edge2:train:45:stop", 1, None, {"rpc.timeout_s": 5}, ()),
}


@pytest.mark.parametrize("case", CASES)
def test_the_job_survives_and_ends_like_an_untouched_run(mnist_root, untouched, tmp_path, case):
    fault, restarts, resumed_from, keys, args = CASES[case]
    if args == OVER_A_FINISHED_RUN:
        shutil.copytree(untouched, tmp_path, dirs_exist_ok=True)
    result = _job(mnist_root, tmp_path, fault, *args, **keys)
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count("resumed from") == restarts, result.stdout[-4000:]
    summary = _ends_like(tmp_path, untouched)
    assert summary["restarts"] == restarts
    resumes = [r for r in _records(tmp_path) if r.get("event") == "resume"]
    assert [r["attempt"] for r in resumes] == list(range(1, restarts + 1)), resumes
    if resumed_from is not None:
        assert resumes[0]["step"] == resumed_from, resumes


def test_the_central_killed_in_the_middle_of_a_checkpoint_write(mnist_root, untouched, tmp_path):
    """The central stops itself (SIGSTOP) between two files of the step-40 checkpoint; the test sees
    the half-written folder (one part in, no manifest) and SIGKILLs the central right there. The
    restart removes the folder, resumes from step 20 and ends like the untouched run."""
    # Files 1-3 are step 20's (central, edge1, edge2); the 5th is step 40's second.
    cmd = torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **KEYS), max_restarts=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(SPLIT_TRAINER_FAULT="central:checkpoint:5:stop"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = Lines(proc)
    try:
        out.wait_for(lambda line: line.startswith("checkpoint step 20 saved"), timeout=300)
        central = rank_pid(proc.pid, 0)
        deadline = time.monotonic() + 120
        while Path(f"/proc/{central}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":  # not yet stopped
            assert time.monotonic() < deadline, "the central never stopped inside its write"
            time.sleep(0.05)
        half = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step_00000040.tmp")]
        assert len(half) == 1 and sorted(p.name for p in half[0].iterdir()) == ["central.pt"], half
        os.kill(central, signal.SIGKILL)  # the kill lands here, in the middle of the write
        text = out.rest(timeout=400)
    finally:
        end_tree(proc.pid)
    assert proc.returncode == 0, text[-4000:]
    assert "checkpoint step 40 saved" in text.split("resumed from")[1]  # written again after the restart only
    assert text.split("resumed from")[0].count("checkpoint step 40 saved") == 0
    summary = _ends_like(tmp_path, untouched)
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == 20
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # removed


STOPPED = {signal.SIGINT: "interrupted (SIGINT): run the same command to resume from the newest checkpoint",
           signal.SIGTERM: "stopped by SIGTERM: torchrun stops every rank when another rank fails"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "cancel"])
def test_a_stopped_job_leaves_nothing_behind_and_the_same_command_resumes(mnist_root, untouched, tmp_path, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM to torchrun's whole process group: torchrun passes
    the signal to every rank and exits 1 (its own SignalException); the central says which signal
    in one line (its own exit code, 130 or 143, is test_training's: torchrun does not report it)."""
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
        rest, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - started
    finally:
        end_tree(proc.pid)
    assert proc.returncode == 1, rest[-3000:]
    lines = [l for l in rest.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(lines) == 1 and STOPPED[sig] in lines[0], rest[-3000:]
    assert f"SignalException: Process {proc.pid} got signal: {int(sig)}" in rest  # torchrun's own end
    # Every rank ended by itself, sooner than torchrun's 30 s grace before it SIGKILLs one.
    assert stopped_in < 20, stopped_in
    for pid in ranks:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    loaded = checkpoint.find_resumable(tmp_path / "checkpoints", warn=pytest.fail)
    assert loaded is not None and loaded.step >= 20

    again = run(cmd, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {loaded.path}" in again.stdout
    _ends_like(tmp_path, untouched)


def test_a_full_disk_ends_the_job_with_one_line_and_keeps_the_previous_checkpoint(mnist_root, tmp_path):
    # Files 1-3 are step 20's; the 5th is step 40's second file: the write fails with ENOSPC.
    result = _job(mnist_root, tmp_path, "central:checkpoint:5:enospc", max_restarts=0)
    assert result.returncode == 1 and "exitcode  : 1" in result.stdout, result.stdout[-3000:]  # torchrun's, the central's
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
    untouched = run(loopback_cmd(mnist_root, tmp_path / "a", 2, **{**KEYS, **keys}))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    killed = _job(mnist_root, tmp_path / "b", "edge2:train:25:kill", **keys)
    assert killed.returncode == 0, killed.stdout[-4000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert b["restarts"] == 1 and b["resumed_from_step"] in (20, 40) and b["steps"] == a["steps"]
    assert abs(a["test_loss"] - b["test_loss"]) < 1e-6 and a["test_accuracy"] == b["test_accuracy"]
    first, second = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in "ab")
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6, msg=key)
    part = checkpoint.find_resumable(tmp_path / "b" / "checkpoints", warn=pytest.fail).parts["edge2"]["data"]
    shards = json.loads((tmp_path / "b" / "partition.json").read_text())
    assert part["train_samples"] == shards["edge2"]["train"] and part["next_batch"] == shards["edge2"]["train_batches"]
