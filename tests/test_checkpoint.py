"""Checkpoint files: completeness, verification, pruning, kills during a write, refusals."""

import hashlib
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch

from split_trainer.config import ConfigError, load_config
from split_trainer.model.plan import plan_for
from split_trainer.records import checkpoint
from split_trainer.records.state import Progress
from split_trainer.training.checkpointing import CentralPart
from split_trainer.training.drivers import driver_for
from split_trainer.training.stage import Stage

from conftest import ROOT, loopback_overrides


def _parts(value: float) -> dict:
    return {"central": {"w": torch.full((1000,), value)}, "edge1": {"w": torch.full((10,), value)}}


def test_save_load_and_keep_newest(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, _parts(step), {"fingerprint": {"edges": 1}}, keep=3)
    assert [p.name for p in checkpoint.complete_candidates(tmp_path)] == ["step_00000040", "step_00000030",
                                                                        "step_00000020"]
    loaded = checkpoint.find_resumable(tmp_path, warn=pytest.fail)
    assert loaded.step == 40 and torch.equal(loaded.parts["edge1"]["w"], torch.full((10,), 40.0))


def test_truncated_file_is_skipped_for_the_previous_checkpoint(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, step, _parts(step), {}, keep=3)
    newest = tmp_path / "step_00000020" / "central.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    warnings = []
    loaded = checkpoint.find_resumable(tmp_path, warn=warnings.append)
    assert loaded.step == 10
    assert len(warnings) == 1 and "step_00000020/central.pt" in warnings[0] and "truncated" in warnings[0]
    with pytest.raises(ConfigError, match="truncated"):
        checkpoint.resolve(str(tmp_path / "step_00000020"), tmp_path, warn=print)


def test_a_kill_during_a_write_leaves_the_previous_checkpoint(tmp_path):
    # A real SIGKILL of a process in the middle of writing its second checkpoint.
    script = textwrap.dedent(f"""
        import os, signal, torch
        from split_trainer.records import checkpoint
        directory = {str(tmp_path)!r}
        from pathlib import Path
        checkpoint.save(Path(directory), 10, {{"central": torch.ones(3), "edge1": torch.ones(2)}}, {{}}, keep=3)
        real_save, calls = torch.save, []
        def dying_save(obj, f):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f)
        torch.save = dying_save
        checkpoint.save(Path(directory), 20, {{"central": torch.zeros(3), "edge1": torch.zeros(2)}}, {{}}, keep=3)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert result.returncode == -9
    half = [p for p in tmp_path.iterdir() if p.name.startswith(".step_00000020.tmp")]
    assert len(half) == 1 and sorted(p.name for p in half[0].iterdir()) == ["central.pt"]  # the kill landed mid-write
    loaded = checkpoint.find_resumable(tmp_path, warn=pytest.fail)
    assert loaded.step == 10 and torch.equal(loaded.parts["central"], torch.ones(3))
    checkpoint.remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


def test_what_a_run_checkpoints_loads_with_weights_only(tmp_path):
    """The parts as a run writes them (training.checkpointing.save): segments, optimizer state after a step, RNG,
    the progress record, an edge's place in its shard. weights_only refuses any object it does not
    know, so a part that grew one (a Path, a dataclass, a numpy array) could never resume."""
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    plan = plan_for(cfg, cfg.train.seed)
    central, edge = Stage(plan.on("central"), cfg.train), Stage(plan.on("edge"), cfg.train)
    loss = central.loss(central.modules[1](torch.randn(4, 64, 12, 12)), torch.tensor([0, 1, 2, 3]))
    central.backprop(1, loss, None, torch.zeros(1), 0.05)  # one SGD step: momentum buffers in the state
    progress = Progress(step=5, seed=1, last_eval=[0.5, 0.9], edges=["edge1"], served={"edge1": 5},
                        trained=["edge1"], steps_per_epoch=9)
    parts = {"central": CentralPart(central, progress).state_dict(),
             "edge1": {**edge.part(), "data": {"epoch": 0, "next_batch": 5, "train_samples": 600, "test_samples": 100}}}
    checkpoint.save(tmp_path, 5, parts, {"fingerprint": checkpoint.fingerprint(cfg, "plan", {})}, keep=1)
    for name in ("central", "edge1"):
        torch.load(tmp_path / "step_00000005" / f"{name}.pt", weights_only=True)
    loaded = checkpoint.load(tmp_path / "step_00000005")
    assert loaded.parts["central"]["progress"] == asdict(progress)
    assert any("momentum_buffer" in s for s in loaded.parts["central"]["optimizers"]["1"]["state"].values())


def test_the_edge_count_binds_a_checkpoint_only_when_the_edges_hold_the_data():
    """Another edge count resumes (tests/test_elastic.py), except with edge-held data, whose
    shards are carved over topology.edges."""
    def fingerprint(*overrides):
        cfg = load_config(ROOT / "configs" / "mnist.yaml", list(overrides))
        return checkpoint.fingerprint(cfg, "plan", driver_for(cfg).fingerprint(cfg))
    assert fingerprint("topology.edges=2") == fingerprint("topology.edges=4")
    edge_held = "data.placement=edge"
    assert fingerprint("topology.edges=2", edge_held) != fingerprint("topology.edges=4", edge_held)


def test_checkpoint_from_another_plan_is_refused(loopback, in_process, mnist_root, tmp_path):
    loopback(tmp_path, 1, **{"train.max_steps": 10, "checkpoint.every_steps": 5})
    assert (tmp_path / "checkpoints" / "step_00000010" / "manifest.json").is_file()
    code, out, err = in_process(*loopback_overrides(mnist_root, tmp_path, 1, **{"train.max_steps": 20,
                                                                             "model.split": "relu1"}))
    assert code == 2, out + err
    assert ("was written for plan=edge conv1..pool | central dropout1..fc2, but the config gives "
            "plan=edge conv1..relu1 | central conv2..fc2") in err


def test_altered_bytes_of_the_same_size_are_skipped(tmp_path):
    for step in (10, 20):
        checkpoint.save(tmp_path, step, _parts(step), {}, keep=3)
    newest = tmp_path / "step_00000020" / "edge1.pt"
    data = bytearray(newest.read_bytes())
    data[-40] ^= 0xFF  # one flipped byte inside the tensor data, same size
    newest.write_bytes(bytes(data))
    warnings = []
    assert checkpoint.find_resumable(tmp_path, warn=warnings.append).step == 10
    assert len(warnings) == 1 and "edge1.pt: altered" in warnings[0]


class _Payload:
    """Unpickling this would create the marker file: code run by loading a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    checkpoint.save(tmp_path, 10, _parts(1.0), {}, keep=3)
    checkpoint.save(tmp_path, 20, _parts(2.0), {}, keep=3)
    marker = tmp_path / "pwned"
    hostile = tmp_path / "step_00000020" / "central.pt"
    torch.save({"w": torch.ones(3), "x": _Payload(str(marker))}, hostile)
    # Whoever planted it rewrote the manifest too, so sizes and hashes match.
    manifest_path = tmp_path / "step_00000020" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = hostile.read_bytes()
    manifest["files"]["central.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    warnings = []
    assert checkpoint.find_resumable(tmp_path, warn=warnings.append).step == 10
    assert len(warnings) == 1 and "refused by torch.load(weights_only=True)" in warnings[0]
    with pytest.raises(ConfigError, match="refused by torch.load"):
        checkpoint.resolve(str(tmp_path / "step_00000020"), tmp_path, warn=print)
    assert not marker.exists()  # nothing ran


def _rewrite(folder, name: str, data: bytes) -> None:
    """Replace ``folder/name`` and its manifest entry, as whoever can write the folder could."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _stamp(folder, **fields) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def test_newest_is_by_job_then_step_and_never_by_a_clock(tmp_path):
    """The clock stepped back, a far-future time and a time that is no number: the order is the
    steps'; pruning keeps the three newest steps; a manifest with no parts at a far step is skipped
    with one line and pruned into nothing."""
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, _parts(step), {}, keep=3)
    _stamp(tmp_path / "step_00000010", written_at=4e12)  # far future
    _stamp(tmp_path / "step_00000020", written_at="yesterday")
    fake = tmp_path / "step_99999999"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"step": 99999999, "job": f"{999999:06d}-{'0' * 32}",
                                                    "files": {"central.pt": {"bytes": 10, "sha256": "0"}}}))
    checkpoint.save(tmp_path, 40, _parts(40), {}, keep=3)  # the clock stepped back: written_at is older
    _stamp(tmp_path / "step_00000040", written_at=0)
    assert [p.name for p in checkpoint.complete_candidates(tmp_path)] == ["step_00000040", "step_00000030",
                                                                        "step_00000020"]
    warnings = []
    assert checkpoint.find_resumable(tmp_path, warn=warnings.append).step == 40
    assert len(warnings) == 1 and "step_99999999/central.pt: missing" in warnings[0], warnings
    assert fake.is_dir()  # skipped, never pruned


def test_a_job_started_over_in_the_same_folder_is_newer_than_the_steps_before_it(tmp_path):
    run_dir, folder = tmp_path, tmp_path / "checkpoints"
    first = checkpoint.start_job(run_dir, "agent", folder)
    for step in (10, 20, 30):
        checkpoint.save(folder, step, _parts(step), {"job": first}, keep=2)
    checkpoint.start_job(run_dir, "agent", folder)  # job.json now names the first job's successor
    again = checkpoint.start_job(run_dir, "another agent", folder)  # --resume never: one more
    assert [checkpoint.generation(job) for job in (first, again)] == [1, 3]
    checkpoint.save(folder, 10, _parts(0.5), {"job": again}, keep=2)
    assert [p.name for p in checkpoint.complete_candidates(folder)] == ["step_00000010", "step_00000030"]
    assert checkpoint.find_resumable(folder, warn=pytest.fail).manifest["job"] == again


def test_a_compressed_part_is_refused_before_it_is_inflated(tmp_path):
    """16 kB of deflated archive that torch.load would inflate to 16 MB of tensor: refused in one
    line, the previous checkpoint taken; the same as a model file."""
    import io
    import zipfile

    checkpoint.save(tmp_path, 10, _parts(1.0), {}, keep=3)
    checkpoint.save(tmp_path, 20, _parts(2.0), {}, keep=3)
    honest = io.BytesIO()
    torch.save({"w": torch.zeros(4_000_000)}, honest)
    bomb = io.BytesIO()
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    assert len(bomb.getvalue()) < 100_000
    _rewrite(tmp_path / "step_00000020", "central.pt", bomb.getvalue())
    warnings = []
    assert checkpoint.find_resumable(tmp_path, warn=warnings.append).step == 10
    assert len(warnings) == 1 and "claims more than its" in warnings[0] and "\n" not in warnings[0], warnings
    from split_trainer.model.model_file import read_model
    (tmp_path / "model.pt").write_bytes(bomb.getvalue())
    with pytest.raises(ConfigError, match="claims more than its"):
        read_model(tmp_path / "model.pt")


def test_a_run_resumes_its_newest_step_whatever_the_clocks_in_its_folder_say(loopback, mnist_root, tmp_path):
    """A real run's folder after a clock stepped back (its last checkpoint stamped before the
    others), with one stamped in the far future and a planted manifest with no parts at a far step:
    the same command resumes from the last step, keeps the newest three, and leaves the plant."""
    loopback(tmp_path, 1, **{"train.max_steps": 20, "checkpoint.every_steps": 5})
    folder = tmp_path / "checkpoints"
    _stamp(folder / "step_00000020", written_at=0)
    _stamp(folder / "step_00000010", written_at=4e12)
    plant = folder / "step_99999999"
    plant.mkdir()
    job = json.loads((folder / "step_00000020" / "manifest.json").read_text())["job"]
    (plant / "manifest.json").write_text(json.dumps({"step": 99999999, "job": job, "files": {}}))
    summary = loopback(tmp_path, 1, **{"train.max_steps": 25, "checkpoint.every_steps": 5})
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 25
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000015", "step_00000020", "step_00000025",
                                                      "step_99999999"]


def test_a_poisoned_edge_stops_the_run_before_a_checkpoint_and_the_same_command_resumes(in_process, mnist_root,
                                                                                        monkeypatch, tmp_path):
    """edge1's weights turn NaN at its 6th training call (the relay engine's calls also carry the
    last gradients of each span: its batch of step 9): one line names the step and the edge, nothing
    past step 5 is checkpointed, and the same command without the fault resumes from step 5 and
    finishes."""
    args = loopback_overrides(mnist_root, tmp_path, 2, **{"train.max_steps": 20, "checkpoint.every_steps": 5})
    monkeypatch.setenv("SPLIT_TRAINER_FAULT", "edge1:train:6:nan")
    code, out, err = in_process(*args)
    assert code == 1 and len(err.strip().splitlines()) == 1, (out + err)[-3000:]
    assert "step 9: the loss of the batch from edge1 is nan" in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    monkeypatch.delenv("SPLIT_TRAINER_FAULT")
    code, out, err = in_process(*args)
    assert code == 0, (out + err)[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_step"] == 5 and summary["steps"] == 20 and math.isfinite(summary["test_loss"])


def test_weights_poisoned_with_a_finite_loss_are_not_checkpointed(in_process, mnist_root, monkeypatch, tmp_path):
    """edge1's weights turn NaN as the central collects its part for the second checkpoint (step
    10): every loss so far was finite, and still nothing of the poisoned state is written."""
    args = loopback_overrides(mnist_root, tmp_path, 2, **{"train.max_steps": 20, "checkpoint.every_steps": 5})
    monkeypatch.setenv("SPLIT_TRAINER_FAULT", "edge1:export:2:nan")
    code, out, err = in_process(*args)
    assert code == 1 and len(err.strip().splitlines()) == 1, (out + err)[-3000:]
    assert "step 10: the weights of edge1 (conv1.weight) hold non-finite values: not checkpointed" in err, err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
