"""The activation noise's epsilon counts every release of a training sample (docs/privacy.md): under
free_first, with an edge away and across a failure the count is the true one, checked against the
checkpoint's own record of what each edge served; and the same command run again on a finished
run says so, with its figures, and trains, evaluates and writes nothing. All on loopback."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from split_trainer.core import faults
from split_trainer.transport.loopback import LoopbackTransport

from conftest import quick_overrides

NOISE = {"privacy.clip": 5.0, "privacy.noise": 1.0}
EDGE_DATA = {"data.placement": "edge", "data.partition": "iid", "logging.every_steps": 8}


@pytest.fixture
def train(in_process, mnist_root):
    """``train(run_dir, edges, **keys) -> (exit code, output)``: one loopback run in this process."""
    def run(run_dir: Path, edges: int, **keys) -> tuple[int, str]:
        code, out, err = in_process(*quick_overrides(mnist_root, run_dir, edges,
                                                     **{"topology.transport": "loopback", **keys}))
        return code, out + err
    return run


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _served(run_dir: Path, step: int) -> dict[str, int]:
    """Each edge's training batches, as the checkpoint at ``step`` records them."""
    part = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "central.pt", weights_only=True)
    return part["progress"]["served"]


def _shard_batches(run_dir: Path) -> dict[str, int]:
    partition = json.loads((run_dir / "partition.json").read_text())
    return {name: shard["train_batches"] for name, shard in partition.items() if name.startswith("edge")}


def _accountant(releases: int) -> float:
    """Opacus's own RDP accountant, as the privacy doc states the mechanism: noise multiplier
    noise / 2 (sensitivity 2 x clip), sampling rate 1, one step per release, delta 1e-5."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(NOISE["privacy.noise"] / 2, 1.0, releases)]
    return accountant.get_epsilon(1e-5)


def _check(summary: dict, releases: dict[str, int]) -> None:
    """The summary reports ``releases`` per edge, and the epsilon of the most-released sample."""
    privacy = summary["privacy"]
    assert {name: edge["releases"] for name, edge in privacy["per_edge"].items()} == releases
    assert privacy["releases"] == max(releases.values())
    assert privacy["epsilon"] == pytest.approx(_accountant(max(releases.values())), rel=1e-3)
    for name, count in releases.items():
        assert privacy["per_edge"][name]["epsilon"] == pytest.approx(_accountant(count), rel=1e-3)


@pytest.mark.slow  # 33 steps of three edges
def test_free_first_counts_the_passes_an_edge_starts_inside_an_epoch(train, tmp_path):
    """Dirichlet shards of 15, 16 and 2 batches, one epoch of 33 steps, free_first: edge3 takes
    about a third of the steps and goes round its two batches several times in the epoch."""
    code, out = train(tmp_path, 3, **NOISE, **{
        **EDGE_DATA, "data.partition": "dirichlet", "data.dirichlet_alpha": 0.2, "train.seed": 4,
        "train.dispatch": "free_first", "train.epochs": 1})
    assert code == 0, out[-3000:]
    summary, batches = _summary(tmp_path), _shard_batches(tmp_path)
    served = _served(tmp_path, summary["steps"])
    assert batches == {"edge1": 15, "edge2": 16, "edge3": 2} and sum(served.values()) == summary["steps"] == 33
    true = {name: -(-served[name] // batches[name]) for name in batches}  # a pass begun releases its first samples
    _check(summary, true)
    assert true["edge3"] > 1, served  # one epoch: counting epochs would have reported one release
    assert "planned: epsilon" in out  # the banner's figure is the plan's, and says so


@pytest.mark.slow  # runs of their own: the fast tier's budget
def test_an_edge_away_keeps_its_count_while_the_others_go_round_their_shards(train, tmp_path, monkeypatch):
    """Two edges of 8 batches (an epoch of 16 steps): 8 steps with both, then edge2 is away and
    edge1 trains alone to step 24: it starts a third pass in the run's second epoch."""
    keys = {**NOISE, **EDGE_DATA, "topology.min_edges": 1, "checkpoint.every_steps": 4, "data.limit_train": 1024}
    code, out = train(tmp_path, 2, **keys, **{"train.max_steps": 8})
    assert code == 0, out[-3000:]
    batches = _shard_batches(tmp_path)
    _check(_summary(tmp_path), {"edge1": 1, "edge2": 1})

    monkeypatch.setattr(LoopbackTransport, "members", lambda self: ["edge1"])  # the rendezvous brought edge1 only
    code, out = train(tmp_path, 2, **keys, **{"train.max_steps": 24})
    assert code == 0, out[-3000:]
    assert "edge2 left at step 8" in out
    served = _served(tmp_path, 24)
    assert served == {"edge1": 20, "edge2": 4}
    true = {name: -(-served[name] // batches[name]) for name in served}
    assert true == {"edge1": 3, "edge2": 1}  # two epochs started; edge1's samples went out three times
    _check(_summary(tmp_path), true)


@pytest.mark.slow  # runs of their own: the fast tier's budget
def test_batches_redone_after_a_failure_count_again(train, tmp_path, monkeypatch):
    """Two edges of 16 batches, spans of 8 steps: the checkpoint at step 16 fails (a full disk)
    after the span 8..16 went out; the resumed run sends batches 4..7 of each edge's first pass
    again, so their samples have been released twice, though no edge has begun a second pass."""
    keys = {**NOISE, **EDGE_DATA, "checkpoint.every_steps": 8, "train.edge_sync_every": 8}
    monkeypatch.setattr(faults, "_armed", {})  # armed in this process: put back after the test
    monkeypatch.setattr(faults, "_seen", Counter())
    monkeypatch.setenv("SPLIT_TRAINER_FAULT", "central:checkpoint:4:enospc")  # central.pt, edge1, edge2; then this
    code, out = train(tmp_path, 2, **keys, **{"train.max_steps": 24})
    assert code == 1 and "No space left on device" in out, out[-3000:]
    assert _served(tmp_path, 8) == {"edge1": 4, "edge2": 4}
    assert not (tmp_path / "checkpoints" / "step_00000016").exists()

    monkeypatch.delenv("SPLIT_TRAINER_FAULT")
    faults._armed.clear()
    code, out = train(tmp_path, 2, **keys, **{"train.max_steps": 16})
    assert code == 0 and "resumed from" in out, out[-3000:]
    assert _served(tmp_path, 16) == {"edge1": 8, "edge2": 8}  # by served alone: one pass begun, one release
    _check(_summary(tmp_path), {"edge1": 2, "edge2": 2})


def _files(run_dir: Path) -> dict[str, tuple]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_the_same_command_on_a_finished_run_says_so_and_changes_nothing_but_completes_a_killed_one(train, tmp_path):
    keys = {**NOISE, "train.max_steps": 6, "checkpoint.every_steps": 3}
    code, out = train(tmp_path, 1, **keys)
    assert code == 0, out[-3000:]
    summary, before = _summary(tmp_path), _files(tmp_path)

    code, out = train(tmp_path, 1, **keys)
    assert code == 0, out[-3000:]
    lines = out.strip().splitlines()
    assert lines[0] == (f"already finished: the checkpoint at step 6 ({tmp_path / 'checkpoints' / 'step_00000006'}) "
                        f"ends this run; nothing was trained, evaluated or written (--resume never, or another "
                        f"output.run_dir, starts a new run)")
    assert lines[1].startswith(f"done: steps 6 epochs {summary['epochs']:.4f} test_loss {summary['test_loss']:.4f} "
                               f"test_accuracy {summary['test_accuracy']:.4f} wall_time_s {summary['wall_time_s']:.4f}")
    assert f"samples_per_s {summary['samples_per_s']:.4f}" in lines[1]
    assert lines[1].endswith(f"(from {tmp_path / 'summary.json'})")
    assert len(lines) == 2 and _files(tmp_path) == before

    # Killed after its last checkpoint, before its outputs: not finished, so the same command
    # writes them (the model as the checkpoint holds it, the summary with the run's last evaluation).
    model = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    (tmp_path / "summary.json").unlink()
    (tmp_path / "model.pt").unlink()
    code, out = train(tmp_path, 1, **keys)
    assert code == 0 and "already finished" not in out and "resumed from" in out, out[-3000:]
    again = _summary(tmp_path)
    assert (again["steps"], again["test_loss"], again["test_accuracy"]) == (6, summary["test_loss"],
                                                                          summary["test_accuracy"])
    rewritten = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(rewritten[k], model[k]) for k in model)

    code, out = train(tmp_path, 1, **{**keys, "train.max_steps": 9})  # asked for more: it trains on
    assert code == 0 and "resumed from" in out and _summary(tmp_path)["steps"] == 9, out[-3000:]
