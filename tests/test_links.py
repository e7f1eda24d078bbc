"""Thin links: 8 bits on the wire, a second batch in flight, and what really crosses a network
(benchmarks/links.py's namespaces)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from split_trainer.config import ConfigError, load_config
from split_trainer.transport.wire import pack, unpack

from conftest import ROOT, TUTORIAL_PLAN, child_env, loopback_cmd, quick_overrides, run, torchrun_cmd

# The tutorial's plan at batch 64: values per sample at its three cuts (16x7x7, 32x2x2, 64x1x1).
TUTORIAL_CUTS = {"after pool0": 784, "after pool1": 128, "after relu2": 64}


@pytest.mark.parametrize("kind, largest", [("int8", 127), ("float8", 448)])
def test_eight_bits_come_back_within_one_quantisation_step(kind, largest):
    x = torch.randn(64, 16, 7, 7) * torch.logspace(-4, 2, 64).view(-1, 1, 1, 1)  # samples of every magnitude
    packed = pack(x, kind)
    assert packed.values.element_size() == 1 and packed.scale.shape == (64,)
    back = unpack(packed)
    scale = x.abs().flatten(1).amax(1).view(-1, 1, 1, 1) / largest
    if kind == "int8":  # evenly spaced codes: half a step
        assert ((back - x).abs() <= scale / 2 + 1e-6 * x.abs()).all()
    else:  # e4m3: 3 mantissa bits, so within 1/16 of the value, or half the smallest step near zero
        assert ((back - x).abs() <= torch.maximum(x.abs() / 16, scale * 2.0 ** -10)).all()


@pytest.mark.parametrize("keys, words", [
    ({"rpc.activation_dtype": "int8", "train.engine": "autograd"}, "rpc.activation_dtype=int8 needs train.engine=relay"),
    ({"rpc.gradient_dtype": "bfloat16", "train.engine": "autograd"}, "rpc.gradient_dtype=bfloat16 needs train.engine"),
    ({"train.in_flight": 2, "train.engine": "autograd"}, "train.in_flight=2 needs train.engine=relay"),
    ({"rpc.channels": "[carrier_pigeon]"}, "rpc.channels must be null or a list of TensorPipe channels"),
])
def test_settings_that_cannot_work_together_are_refused(keys, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [f"{k}={v}" for k, v in keys.items()])


@pytest.mark.slow
def test_eight_bits_on_every_cut_through_distributed_autograd(mnist_root, tmp_path):
    """The alternating plan's three cuts in float8 on torchrun: each value a byte, plus one float32
    scale per sample and the carrier of the returning gradient's scales, inside distributed
    autograd's own messages. (Every wire type on both engines: test_loopback; int8 on the relay
    engine over torch RPC: the in-flight tests below.)"""
    keys = {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN, "train.max_steps": 40, "train.engine": "autograd",
            "rpc.activation_dtype": "float8", "logging.every_steps": 10}
    result = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for cut, values in TUTORIAL_CUTS.items():
        assert summary["bytes"]["per_cut"][cut]["forward"] == 40 * 64 * (values + 8), cut  # the scale and carrier
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < 0.8 * losses[0], losses


# A local loss starts slower (the central learns on features that move under it): 61 % after these
# 64 steps, 96 % after the README run's first epoch.
IN_FLIGHT = {"train.in_flight": 4, "data.limit_train": 4096, "train.epochs": 1, "checkpoint.every_steps": 20,
             "train.edge_sync_every": 10, "train.seed": 3, "data.placement": "edge", "rpc.activation_dtype": "int8",
             "train.edge_loss": "local"}


@pytest.mark.slow
@pytest.mark.seconds(105)
def test_batches_in_flight_under_a_local_loss_learn_and_resume_exactly(mnist_root, tmp_path):
    """Edge placement, int8, four batches in flight per edge under a local loss, and no gradient
    byte comes down: an edge killed mid-span under --max-restarts; the job resumes from its
    checkpoint and ends where the untouched run (the same config in one process) ends. (Two in
    flight with the loss on the central: test_faults, the edge-placement case.)"""
    untouched = run(loopback_cmd(mnist_root, tmp_path / "a", 2, **IN_FLIGHT))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    reference = json.loads((tmp_path / "a" / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    learnt = reference["test_accuracy"]
    assert losses[-1] < 0.8 * losses[0] and learnt > 0.5, (losses, learnt)
    # One training call a batch (the relay engine also sends the last gradients of every span):
    # edge2's 25th call is past a checkpoint.
    killed = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path / "b", edges=2, **IN_FLIGHT), max_restarts=2),
                 env=child_env(SPLIT_TRAINER_FAULT="edge2:train:25:kill"))
    assert killed.returncode == 0, killed.stdout[-4000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["bytes"]["per_cut"]["after pool"]["backward"] == 0
    assert all(edge["sent"]["activation_grads"] == 0 for edge in summary["bytes"]["per_edge"].values())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] > 0 and summary["steps"] == 64
    assert abs(summary["test_loss"] - reference["test_loss"]) < 1e-6
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in ("a", "b"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


NETNS = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
needs_netns = pytest.mark.skipif(not NETNS, reason="network namespaces need root and iproute2")


def _links(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    prefix = f"stt{os.getpid() % 10000}"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "links.py"), "--edges", "1", "--steps", "24", "--warmup", "8",
           "--data", str(os.environ.get("SPLIT_TRAINER_MNIST", ROOT.parent / "shared" / "data" / "mnist")),
           "--prefix", prefix, "--out", str(tmp_path / "links.json"), "--timeout", "240", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    finally:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"


@pytest.mark.slow
@needs_netns
def test_the_link_benchmark_leaves_no_namespace_behind_when_a_run_fails(tmp_path):
    result = _links(tmp_path, "--rate", "20mbit", "--set", "train.lr=-1")
    assert result.returncode == 1 and "benchmarks/links.py: error: the job failed" in result.stderr, result.stderr


@pytest.mark.slow
@needs_netns
@pytest.mark.seconds(100)
def test_with_the_basic_channel_the_tensors_cross_the_veth(tmp_path):
    """Unshaped, one edge host: the interface counters grow by at least the accounted tensor bytes,
    each way; with TensorPipe's own choice of channel they do not (cross-memory attach)."""
    result = _links(tmp_path, "--rate", "0", "--channels", "basic", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    basic, auto = json.loads((tmp_path / "links.json").read_text())
    for way in ("up", "down"):
        assert basic["job_link_bytes"][way] >= basic["job_accounted_bytes"][way] >= 24 * 64 * 36_864, basic
        assert auto["job_link_bytes"][way] < 0.5 * auto["job_accounted_bytes"][way], auto
