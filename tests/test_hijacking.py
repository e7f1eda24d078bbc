"""A malicious central (privacy.hijacking, training.malicious): the audit's hijacking attack runs
against a real edge on loopback, and the edge's own check (privacy.scrutiny) stops it; under a
local loss the attack has no lever. The label gap itself on gradients made to have it or not."""

import json

import pytest
import torch

from split_trainer.core.errors import EdgeRefusal
from split_trainer.privacy.scrutiny import AT_LEAST, GradientCheck, label_gap

from conftest import quick_overrides

TINY = {"topology.transport": "loopback", "data.placement": "edge", "privacy.edge_weights": "edges",
        "train.max_steps": 2, "data.limit_train": 256, "data.limit_test": 64}
AUDIT = ["--decoders", "small", "--public", "64", "--private", "64", "--reidentify", "20", "--candidates", "5",
         "--decoder-epochs", "1", "--inversions", "1", "--inversion-steps", "1", "--unsplit", "1", "--unsplit-rounds", "1",
         "--hijack-steps", "8"]


def _gradients(labels: torch.Tensor, by_label: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(len(labels), 32, generator=gen)
    return noise + 3 * torch.eye(32)[labels] if by_label else noise


def test_the_label_gap_tells_a_task_gradient_from_one_that_ignores_the_labels():
    labels = torch.arange(64) % 10
    assert label_gap(_gradients(labels, True), labels) > 0.15
    assert abs(label_gap(_gradients(labels, False), labels)) < 0.05
    assert label_gap(torch.randn(3, 8), torch.tensor([0, 1, 2])) is None  # no pair within a class


def test_the_check_stops_an_edge_once_the_gradients_ignore_the_labels_and_stays_stopped():
    labels, check = torch.arange(64) % 10, GradientCheck("edge1", 0.1)
    for _ in range(20):  # an honest central, however long
        check.forward(labels)
        check.backward(_gradients(labels, True))
    with pytest.raises(EdgeRefusal, match="edge1 stops: the central's gradients no longer depend on the labels"):
        for _ in range(100):  # a hijacking one: the average falls below the threshold within a few batches
            check.forward(labels)
            check.backward(_gradients(labels, False))
    assert check.batches < 20 + 30
    with pytest.raises(EdgeRefusal):
        check.forward(labels)  # and nothing more is computed for that central
    fresh = GradientCheck("edge2", 0.1)
    with pytest.raises(EdgeRefusal):
        for _ in range(AT_LEAST):
            fresh.forward(labels)
            fresh.backward(_gradients(labels, False))
    assert fresh.batches == AT_LEAST  # a verdict needs that many batches, and takes no more


@pytest.mark.slow
@pytest.mark.seconds(40)
def test_the_audits_hijacking_central_is_stopped_by_the_edge_and_has_no_lever_under_a_local_loss(
        in_process, mnist_root, tmp_path):
    reports = {}
    for loss in ("central", "local"):
        run_dir = tmp_path / loss
        code, out, err = in_process(*quick_overrides(mnist_root, run_dir, 1, **TINY, **{"train.edge_loss": loss}))
        assert code == 0, (out + err)[-3000:]
        code, out, err = in_process("audit", "--checkpoint", str(run_dir / "checkpoints"), "--set",
                                    f"data.root={mnist_root}", "--out", str(run_dir / "audit"), *AUDIT)
        assert code == 0, (out + err)[-3000:]
        assert "audit: hijacking 8/8" in out  # its progress, line by line without a terminal
        reports[loss] = json.loads((run_dir / "audit" / "audit.json").read_text())
    central, local = reports["central"]["hijacking"], reports["local"]["hijacking"]
    # Its gradients reached the edge, whose own check stopped it after AT_LEAST batches; the harness
    # then set the check aside to finish the measurement.
    assert central["measured"] and central["lever"] and central["gradient_bytes_sent"] > 0, central
    assert central["detected_at_step"] == AT_LEAST and "stops" in central["verdict"], central
    assert 0 <= central["at_detection"]["reidentified"] <= 1
    row = reports["central"]["cuts"]["after pool"]["hijacking (malicious central, no weights)"]
    assert row["steps"] == 8 and -1 <= row["ssim"] <= 1
    # No gradient ever reaches an edge that trains on its own loss: nothing to hijack with.
    assert local["measured"] and not local["lever"] and local["gradient_bytes_sent"] == 0, local
    assert "detected_at_step" not in local
