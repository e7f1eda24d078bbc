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

from conftest import (ROOT, TUTORIAL_PLAN, Lines, child_env, end_tree, loopback_cmd, made_once, quick_overrides, rank_pid,
                      run, torchrun_cmd)

pytestmark = pytest.mark.slow

# 4,096 samples, batch 64: 64 steps; checkpoints at 20, 40, 60, 64; syncs every 10 steps; augmented
# batches (crop_flip), so that every case also checks that a resumed run augments the same way.
KEYS = {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN, "data.limit_train": 4096,
        "data.limit_test": 2000, "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10,
        "train.seed": 3, "data.augment": "crop_flip"}


def _job(mnist: Path, run_dir: Path, fault: str = "", *args: str, max_restarts: int = 2,
         **keys) -> subprocess.CompletedProcess:  # a bound of 3 minutes an attempt
    cmd = torchrun_cmd(3, *args, *quick_overrides(mnist, run_dir, edges=2, **{**KEYS, **keys}),
                       max_restarts=max_restarts)
    return run(cmd, timeout=180 * (1 + max_restarts), env=child_env(SPLIT_TRAINER_FAULT=fault))


@pytest.fixture(scope="session")
def untouched(mnist_root, tmp_path_factory) -> Path:
    def train(run_dir: Path) -> None:
        result = run(loopback_cmd(mnist_root, run_dir, 2, **KEYS))
        assert result.returncode == 0, result.stdout[-3000:]
    return made_once(tmp_path_factory, "faults_untouched", train)


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


# One job, one fault in each torchrun attempt: every restart resumes into the next fault, and the
# job still ends where the untouched run ends. It runs with --resume never in a copy of the finished
# untouched run's folder: the first restart must take this job's own checkpoint, not step 64.
CHAIN = [  # the case, its fault (in the attempt of its place), the step the resume after it comes from
    ("a: edge killed in a training step, over a finished run", "edge2:train:45:kill", 20),
    ("f: a second failure right after the resume", "edge2:train:4:kill", 20),
    ("b: edge killed during a replica sync", "edge1:sync:3:kill", 40),  # the syncs at 30, 40, 50
    ("e: central killed in a training step", "central:train:5:kill", 40),
    ("d: edge killed while a checkpoint is gathered", "edge1:export:1:kill", 40),  # step 60's never lands
    ("c: edge killed during evaluation", "edge2:eval:2:kill", 60),  # the epoch's checkpoint follows it
    # The call times out after rpc.timeout_s (5 s here); torchrun kills the frozen rank before its restart.
    ("g: edge frozen, caught by a small rpc.timeout_s", "edge2:train:1:stop", 60),
]


@pytest.mark.seconds(200)
def test_the_job_survives_a_fault_in_every_attempt_and_ends_like_an_untouched_run(mnist_root, untouched, tmp_path):
    shutil.copytree(untouched, tmp_path, dirs_exist_ok=True)
    faults = ",".join(f"{fault}:{attempt}" for attempt, (_, fault, _) in enumerate(CHAIN))
    result = _job(mnist_root, tmp_path, faults, "--resume", "never", max_restarts=len(CHAIN), **{"rpc.timeout_s": 5})
    assert result.returncode == 0, result.stdout[-4000:]
    assert result.stdout.count("resumed from") == len(CHAIN), result.stdout[-4000:]
    summary = _ends_like(tmp_path, untouched)
    assert summary["restarts"] == len(CHAIN)
    resumes = [(r["attempt"], r["step"]) for r in _records(tmp_path) if r.get("event") == "resume"]
    expected = [(attempt, step) for attempt, (_, _, step) in enumerate(CHAIN, start=1)]
    assert resumes == expected, [(case, got) for (case, _, _), got in zip(CHAIN, resumes)]


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
# What each leaves behind is the same newest checkpoint: the same command is run again after one.
RUN_AGAIN = signal.SIGINT


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "cancel"])
@pytest.mark.seconds(45)
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
    if sig != RUN_AGAIN:
        return
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


@pytest.mark.seconds(70)
def test_a_small_timeout_never_fails_a_healthy_job_on_a_loaded_machine(mnist_root, tmp_path):
    """rpc.timeout_s bounds a call's own work: nothing queues behind another call on its edge.
    The full test set in 50 evaluation calls, the default model, and a busy process competing for
    the cores with the three ranks: if an edge's 25 calls queued, the later ones would wait far
    past the timeout."""
    load = [subprocess.Popen(["python3", "-c", "while True: pass"])]
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


@pytest.mark.seconds(70)
def test_an_edge_killed_in_edge_placement_with_batches_in_flight_resumes_at_its_own_position(mnist_root, tmp_path):
    """Each edge draws from its own Dirichlet shard, in int8, two batches in flight: an edge killed
    mid-span; the checkpoints hold no batch in flight, each edge continues at its own position (part
    of its checkpoint) and the run ends where an untouched one ends. (A local loss, in flight:
    test_links.)"""
    keys = {"model.name": "mnist_cnn", "model.split": "pool", "model.plan": "null", "data.placement": "edge",
            "data.partition": "dirichlet", "train.in_flight": 2, "rpc.activation_dtype": "int8"}
    untouched = run(loopback_cmd(mnist_root, tmp_path / "a", 2, **{**KEYS, **keys}))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    killed = _job(mnist_root, tmp_path / "b", "edge2:train:25:kill", **keys)
    assert killed.returncode == 0, killed.stdout[-4000:]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["restarts"] == 1 and b["resumed_from_step"] in (20, 40) and b["steps"] == a["steps"]
    assert abs(a["test_loss"] - b["test_loss"]) < 1e-6 and a["test_accuracy"] == b["test_accuracy"]
    first, second = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in "ab")
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-6, msg=key)
    part = checkpoint.find_resumable(tmp_path / "b" / "checkpoints", warn=pytest.fail).parts["edge2"]["data"]
    shards = json.loads((tmp_path / "b" / "partition.json").read_text())
    assert part["train_samples"] == shards["edge2"]["train"] and part["next_batch"] == shards["edge2"]["train_batches"]
