"""Fault tolerance under torchrun --max-restarts: kill an edge, resume, end where an untouched run ends."""

import json

import pytest
import torch

from conftest import quick_overrides, run, run_and_kill, torchrun_cmd

pytestmark = pytest.mark.slow

KEYS = {"data.limit_train": 4096, "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10,
        "train.seed": 3}


def test_killed_edge_is_restarted_and_ends_like_an_untouched_run(mnist_root, tmp_path):
    """The killed job starts over (--resume never) in the folder of the finished untouched run: its
    restart must take its own step-20 checkpoint, not the finished run's step 64."""
    untouched = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **KEYS)))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    reference = json.loads((tmp_path / "summary.json").read_text())
    a = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]

    code, out = run_and_kill(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path, edges=2, **KEYS), "--resume",
                                          "never", max_restarts=2), after_line="checkpoint step 20 saved", rank=2)
    assert code == 0, out[-4000:]
    assert "resumed from" in out, out[-4000:]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == 20 and summary["steps"] == 64
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 64  # every step logged once
    assert [r["attempt"] for r in records if r.get("event") == "resume"] == [1]

    assert abs(summary["test_loss"] - reference["test_loss"]) < 1e-6
    b = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
