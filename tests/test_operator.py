"""What the operator sees and takes away: console modes, wire accounting, evaluate, export."""

import json
import os
import pty
import subprocess

import pytest
import torch

from split_trainer.config import DataConfig, ModelConfig
from split_trainer.data.datasets import load
from split_trainer.model.models import build_full

from conftest import ROOT, child_env, loopback_overrides, quick_overrides, torchrun_cmd

ACTIVATION_BYTES = 64 * 12 * 12 * 4  # per sample, each way, for the default split
INPUT_BYTES = 28 * 28 * 4


@pytest.mark.slow
@pytest.mark.seconds(1)
def test_plain_log_without_a_terminal(trained_run):
    _, result = trained_run
    assert "\x1b[" not in result.stdout  # no control codes in a file or pipe
    lines = [l for l in result.stdout.splitlines() if l.startswith("step ")]
    assert lines[0].startswith("step 5/32 epoch 1 loss ") and "samples/s" in lines[0] and "edges ok 2/2" in lines[0]


@pytest.mark.slow
def test_live_display_on_a_terminal(mnist_root, tmp_path):
    main, child = pty.openpty()
    cmd = torchrun_cmd(2, *quick_overrides(mnist_root, tmp_path, edges=1, **{"train.max_steps": 12}))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(COLUMNS="160", TERM="xterm"), stdin=child, stdout=child,
                            stderr=child, start_new_session=True)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the pty closes when every writer has exited
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen  # a live, redrawn display
    for header in ("edge1", "batches", "call ms (p95)", "sent", "received", "status", "eta"):
        assert header in screen, header
    assert "\nstep 5/12" not in screen  # not the plain lines


def test_quiet_prints_only_the_summary(in_process, mnist_root, tmp_path):
    code, out, err = in_process("--quiet", *loopback_overrides(mnist_root, tmp_path, 1, **{"train.max_steps": 6}))
    assert code == 0, (out + err)[-3000:]
    ours = [l for l in (out + err).splitlines() if l.startswith(("step", "epoch", "checkpoint", "topology", "done"))]
    assert len(ours) == 1 and ours[0].startswith("done: steps 6")
    summary = json.loads((tmp_path / "summary.json").read_text())  # quiet, not idle: the run's files are all there
    assert summary["steps"] == 6 and (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.seconds(1)
def test_wire_bytes_match_the_model(trained_run):
    run_dir, _ = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    samples = 2048
    edges = summary["bytes"]["per_edge"]
    assert sum(e["batches"] for e in edges.values()) == 32
    assert sum(e["received"]["activations"] for e in edges.values()) == samples * ACTIVATION_BYTES
    assert sum(e["sent"]["activation_grads"] for e in edges.values()) == samples * ACTIVATION_BYTES
    assert sum(e["sent"]["inputs"] for e in edges.values()) == samples * INPUT_BYTES
    implied = 2 * ACTIVATION_BYTES + INPUT_BYTES
    assert implied <= summary["bytes"]["per_train_sample"] <= 1.10 * implied  # control within 10 %
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps[-1]["bytes_received"] >= samples * ACTIVATION_BYTES
    assert set(steps[-1]["call_ms"]) == {"edge1", "edge2"}


@pytest.mark.slow
@pytest.mark.seconds(5)
def test_evaluate_reports_the_runs_last_accuracy(trained_run, in_process, mnist_root):
    run_dir, _ = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    code, out, err = in_process("evaluate", "--checkpoint", str(run_dir / "checkpoints"), "--set",
                                f"data.root={mnist_root}")
    assert code == 0, err
    words = out.split()
    assert float(words[words.index("test_accuracy") + 1]) == summary["test_accuracy"]
    assert abs(float(words[words.index("test_loss") + 1]) - summary["test_loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.seconds(5)
def test_export_runs_without_the_topology(trained_run, in_process, mnist_root, tmp_path):
    run_dir, _ = trained_run
    code, _, err = in_process("export", "--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path / "model.pt"))
    assert code == 0, err
    # The README's three lines:
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    model = build_full(ModelConfig(**saved["model"]), saved["shape"]); model.load_state_dict(saved["state_dict"]); model.eval()
    _, test, _ = load(DataConfig(root=str(mnist_root), limit_test=1000))
    x, y = test.batch(torch.arange(1000))
    predictions = model(x).argmax(1)
    accuracy = int((predictions == y).sum()) / len(y)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert accuracy == summary["test_accuracy"]  # the run evaluated the same 1,000 test samples
    final = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    for key, value in final.items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=1e-6)


def test_evaluate_bad_checkpoint_is_one_line(in_process, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"nope")
    code, _, err = in_process("evaluate", "--checkpoint", str(tmp_path / "junk.pt"))
    assert code == 2 and err.count("\n") == 1 and "not a split_trainer model file" in err


def test_tensorboard_scalars_or_a_one_line_refusal(in_process, mnist_root, tmp_path):
    code, out, err = in_process(*loopback_overrides(mnist_root, tmp_path, 1, **{"logging.tensorboard": "true",
                                                                             "train.max_steps": 10}))
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # CI's environment: the extra is not installed
        assert code == 2 and "logging.tensorboard=true needs the tensorboard extra" in err, out + err
        assert not (tmp_path / "metrics.jsonl").exists()
        return
    assert code == 0, (out + err)[-3000:]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/samples_per_s", "train/bytes_sent", "train/call_ms/edge1",
            "eval/test_accuracy"} <= tags
