"""Training runs on real MNIST: real torchrun launches, and what ends a run. Split training's
equality with single-process training, the U-shaped plan's traffic and the half-precision wire are
tested on the loopback transport (test_loopback.py), which test_loopback checks to be the RPC run."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from split_trainer.cli.standalone import load_merged
from split_trainer.config import load_config
from split_trainer.data.datasets import load
from split_trainer.training.local import train_local

from conftest import ROOT, child_env, end_tree, quick_overrides, run, run_and_kill, torchrun_cmd


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.seconds(35)  # the shared trained_run itself
def test_one_central_two_edges_trains_and_reports(trained_run):
    tmp_path, result = trained_run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["epochs"] == 1.0  # 2048 samples / batch 64
    assert summary["samples_per_s"] > 0 and summary["wall_time_s"] > 0
    steps = [r for r in _records(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(5, 33, 5)) + [32]
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"], steps
    evals = [r for r in _records(tmp_path) if r.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["test_accuracy"] == summary["test_accuracy"] > 0.5
    assert load_config(tmp_path / "config.yaml").topology.edges == 2
    assert "Traceback" not in result.stdout


@pytest.mark.slow
def test_a_killed_edge_ends_the_job_with_one_line(mnist_root, tmp_path):
    cmd = torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **{"train.epochs": 50}))
    code, output = run_and_kill(cmd, after_line="step 10/", rank=1)
    assert code == 1, output[-3000:]  # torchrun's: a worker failed
    central_lines = [l for l in output.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(central_lines) == 1 and "edge1 failed" in central_lines[0], output[-3000:]
    assert "exitcode  : 1" in output  # the central's own code in torchrun's report
    assert "Traceback" not in output.split(central_lines[0])[0]  # torchrun's own report comes after ours
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_a_terminated_central_says_so_in_one_line(mnist_root, tmp_path):
    """SIGTERM is how torchrun and schedulers stop a job: one line, no traceback, no summary."""
    cmd = torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **{"train.epochs": 50}))
    code, output = run_and_kill(cmd, after_line="step 10/", rank=0, sig=signal.SIGTERM)
    assert code == 1, output[-3000:]  # torchrun's: a worker failed
    central_lines = [l for l in output.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(central_lines) == 1 and "stopped by SIGTERM" in central_lines[0], output[-3000:]
    assert "exitcode  : 143" in output and "Traceback" not in output.split(central_lines[0])[0]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("engine", ["autograd", "relay"])
def test_segments_on_the_gpu_equal_local_training_on_the_gpu(mnist_root, tmp_path, engine):
    """Both sides on CUDA (several ranks sharing one GPU); tensors cross the wire on the CPU."""
    keys = {"train.optimizer": "sgd", "train.momentum": 0.0, "model.dropout": "false", "train.max_steps": 20,
            "train.seed": 5, "train.engine": engine, "train.central_device": "cuda", "train.edge_device": "cuda"}
    result = run(torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"^threads: central \d+ on cuda:\d+; edge1 \d+ on cuda:\d+$", result.stdout, re.M), \
        result.stdout[-3000:]  # the banner: both sides on the GPU
    cfg = load_config(tmp_path / "config.yaml")
    train, _, _ = load(cfg.data)
    local = train_local(cfg, train, steps=20, device="cuda").state_dict()
    split = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]  # saved on the CPU
    for key in local:
        torch.testing.assert_close(split[key], local[key].cpu(), rtol=0, atol=1e-4, msg=key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_a_gpu_where_there_is_none_is_one_line(in_process, mnist_root, tmp_path):
    code, _, err = in_process(*quick_overrides(mnist_root, tmp_path, edges=1, **{"train.edge_device": "cuda",
                                                                                 "topology.transport": "loopback"}))
    assert "train.edge_device=cuda, but this host has no CUDA device torch can use" in err
    assert code == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a process of its own, signalled
@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "interrupted (SIGINT): run the same command to resume from the newest checkpoint"),
    (signal.SIGTERM, 143, "stopped by SIGTERM: torchrun stops every rank when another rank fails (its report "
                          "names the rank) or when the job is cancelled")], ids=["ctrl-c", "cancel"])
def test_an_interrupted_run_says_so_in_one_line_and_exits_130_or_143(mnist_root, tmp_path, sig, code, line):
    """The central's own exit code and line (under torchrun they stay inside torchrun, which exits 1:
    test_faults): a one-process run stopped after its first checkpoint, then the same command resumes."""
    keys = {"topology.transport": "loopback", "train.epochs": 50, "checkpoint.every_steps": 10}
    cmd = [sys.executable, "-m", "split_trainer", *quick_overrides(mnist_root, tmp_path, edges=2, **keys)]
    # As a person's Ctrl-C finds it: a shell's background job (a CI script started with &, nohup)
    # inherits SIGINT ignored, and Python then keeps ignoring it rather than raising KeyboardInterrupt.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for text in proc.stdout:
            if text.startswith("checkpoint step 10 saved"):
                break
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        end_tree(proc.pid)
    assert proc.returncode == code, rest[-3000:]
    assert [l for l in rest.splitlines() if l.startswith("split_trainer:")] == [f"split_trainer: [central] error: {line}"]
    assert not (tmp_path / "summary.json").exists()
    again = run([*cmd, "train.max_steps=20"], timeout=120)  # the same command, capped at step 20
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stdout[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from_step"] >= 10


def test_edge_held_weights_average_as_the_central_would(in_process, mnist_root, tmp_path):
    """privacy.edge_weights: edges: the edges fetch each other's replicas and average them in the
    central's order, so the run is the run with central-held weights, bit for bit: syncs every 2
    steps over 3 edges, so that some average only the replicas that trained since the last one."""
    keys = {"topology.transport": "loopback", "train.max_steps": 12, "train.edge_sync_every": 2,
            "checkpoint.every_steps": 6, "data.placement": "edge"}
    for holder in ("central", "edges"):
        code, out, err = in_process(*quick_overrides(mnist_root, tmp_path / holder, edges=3, **{
            **keys, "privacy.edge_weights": holder}))
        assert code == 0, (out + err)[-3000:]
    summaries = [json.loads((tmp_path / h / "summary.json").read_text()) for h in ("central", "edges")]
    assert summaries[0]["test_loss"] == summaries[1]["test_loss"]
    assert summaries[1]["bytes"]["per_edge"]["edge1"]["received"]["edge_state"] == 0
    a, b = (load_merged(tmp_path / h / "checkpoints")[3] for h in ("central", "edges"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
