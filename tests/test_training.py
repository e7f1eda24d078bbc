"""Real torchrun launches of the trainer on loopback, on real MNIST."""

import json
import signal
from pathlib import Path

import pytest
import torch

from split_trainer.config import load_config
from split_trainer.data.datasets import load
from split_trainer.training.local import train_local
from split_trainer.data.shards import Shard
from conftest import TUTORIAL_PLAN, quick_overrides, run, run_and_kill, torchrun_cmd


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
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


PLANS = {"single cut": {"model.name": "mnist_cnn", "model.split": "pool"},
         "alternating": {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN}}


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["autograd", "relay"])
@pytest.mark.parametrize("shape", PLANS)
def test_split_training_equals_local_training(mnist_root, tmp_path, engine, shape):
    """1 edge, no dropout, plain SGD: after 20 steps the parameters equal single-process training."""
    keys = {"train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05, "model.dropout": "false",
            "train.max_steps": 20, "train.seed": 5, "train.engine": engine, **PLANS[shape]}
    result = run(torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    split = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]

    cfg = load_config(tmp_path / "config.yaml")
    train, _, _ = load(cfg.data)
    local = train_local(cfg, train, steps=20).state_dict()
    initial = train_local(cfg, train, steps=0).state_dict()
    assert split.keys() == local.keys()
    for key in local:
        assert not torch.equal(local[key], initial[key])  # training moved every tensor
        torch.testing.assert_close(split[key], local[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
def test_a_killed_edge_ends_the_job_with_one_line(mnist_root, tmp_path):
    cmd = torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **{"train.epochs": 50}))
    code, output = run_and_kill(cmd, after_line="step 10/", rank=2)
    assert code != 0
    central_lines = [l for l in output.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(central_lines) == 1 and "edge2 failed" in central_lines[0], output[-3000:]
    assert "Traceback" not in output.split(central_lines[0])[0]  # torchrun's own report comes after ours
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_a_terminated_central_says_so_in_one_line(mnist_root, tmp_path):
    """SIGTERM is how torchrun and schedulers stop a job: one line, no traceback, no summary."""
    cmd = torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **{"train.epochs": 50}))
    code, output = run_and_kill(cmd, after_line="step 10/", rank=0, sig=signal.SIGTERM)
    assert code != 0
    central_lines = [l for l in output.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(central_lines) == 1 and "stopped by SIGTERM" in central_lines[0], output[-3000:]
    assert "exitcode  : 143" in output and "Traceback" not in output.split(central_lines[0])[0]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["autograd", "relay"])
def test_u_shaped_plan_keeps_inputs_and_labels_on_the_edge_and_equals_local_training(mnist_root, tmp_path, engine):
    """Edge placement, the loss on the edge: the central never receives an input or a label, and the
    parameters equal single-process training on the edge's own batches (1 edge, no dropout, SGD)."""
    keys = {"train.optimizer": "sgd", "train.momentum": 0.0, "model.dropout": "false", "train.max_steps": 20,
            "train.seed": 5, "train.engine": engine, "data.placement": "edge",
            "model.plan": "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"}
    result = run(torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    traffic = summary["bytes"]["per_edge"]["edge1"]
    for kind in ("inputs", "labels"):
        assert traffic["sent"].get(kind, 0) == 0 and traffic["received"].get(kind, 0) == 0, kind
    assert summary["bytes"]["per_cut"]["after dropout2"]["forward"] == 20 * 64 * 128 * 4  # fc1's output, float32

    cfg = load_config(tmp_path / "config.yaml")
    train, test, _ = load(cfg.data)
    shard = Shard.carve(train, test, 1, 1, cfg.data, cfg.train.seed)
    local = train_local(cfg, shard.train, steps=20, order_seed=shard.seed).state_dict()
    split = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    for key in local:
        torch.testing.assert_close(split[key], local[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_activations_halve_the_bytes_and_still_learn(mnist_root, tmp_path, dtype):
    result = run(torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **{
        "rpc.activation_dtype": dtype, "train.max_steps": 30, "logging.every_steps": 10})))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    cut = summary["bytes"]["per_cut"]["after pool"]
    assert cut["forward"] == cut["backward"] == 30 * 64 * 64 * 12 * 12 * 2  # 2 bytes a value, not 4
    losses = [r["loss"] for r in _records(tmp_path) if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("engine", ["autograd", "relay"])
def test_segments_on_the_gpu_equal_local_training_on_the_gpu(mnist_root, tmp_path, engine):
    """Both sides on CUDA (several ranks sharing one GPU); tensors cross the wire on the CPU."""
    keys = {"train.optimizer": "sgd", "train.momentum": 0.0, "model.dropout": "false", "train.max_steps": 20,
            "train.seed": 5, "train.engine": engine, "train.central_device": "cuda", "train.edge_device": "cuda"}
    result = run(torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "central 1 on cuda:0; edge1" in result.stdout or "on cuda" in result.stdout
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
