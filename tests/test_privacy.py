"""Privacy: the defences change what leaves an edge as specified (both engines), edge-held weights
never reach the central, and the audit finds the leaks it is there to find."""

import json
import sys

import pytest
import torch

from split_trainer.config import PrivacyConfig, TrainConfig, load_config
from split_trainer.model.plan import build_plan
from split_trainer.privacy.defences import Defences, distance_correlation, epsilon
from split_trainer.training.engines import engine_for
from split_trainer.training.route import Hop
from split_trainer.training.stage import Stage

from conftest import child_env, quick_overrides, run, torchrun_cmd

MNIST = {"in_channels": 1, "image_size": 28, "num_classes": 10}
U_PLAN = "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"


def _edge(engine: str, **privacy) -> tuple:
    """The edge side of the U-shaped plan, as an edge host builds it."""
    cfg = load_config(None, [f"model.plan={U_PLAN}", f"train.engine={engine}"])
    plan = build_plan(cfg.model, MNIST, seed=0)
    stage = Stage(plan.on("edge"), TrainConfig(engine=engine))
    return engine_for(engine, plan.places, stage, 1, Defences(PrivacyConfig(**privacy), plan.places)), plan


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_activations_leave_clipped_and_noised_as_configured(engine):
    x = torch.randn(64, 1, 28, 28) * 3
    clipped, _ = _edge(engine, clip=2.0)
    out = clipped.run(Hop("forward", 0, "edge"), x, None, 0.01).output
    norms = out.detach().flatten(1).norm(dim=1)
    assert norms.max() <= 2.0 + 1e-4 and norms.min() > 1.9  # every sample was longer than 2: all clipped

    noisy, _ = _edge(engine, clip=2.0, noise=0.5)
    torch.manual_seed(0)
    noised = noisy.run(Hop("forward", 0, "edge"), x, None, 0.01).output.detach()
    difference = noised - out.detach()  # the same weights: what is left is the noise
    assert abs(difference.mean()) < 0.01 and abs(difference.std() - 0.5 * 2.0) < 0.01


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_nopeek_adds_its_gradient_to_the_edges_own(engine):
    """The edge's weights get the gradient that comes back plus nopeek x d(distance correlation):
    with nothing coming back, exactly the latter."""
    x, nothing = torch.randn(32, 1, 28, 28), torch.zeros(32, 64, 12, 12)
    edge, plan = _edge(engine, nopeek=3.0)
    reply = edge.train_hop(Hop("forward", 0, "edge"), x, None, 0.0)
    out = edge.pending[0][-1][1] if engine == "relay" else reply.output  # relay keeps the graph at home
    conv = plan.segments[0].module.conv1.weight
    got = torch.autograd.grad(out, conv, nothing)[0]
    expected = torch.autograd.grad(3.0 * distance_correlation(x, plan.segments[0].module(x)), conv)[0]
    assert expected.norm() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_the_returned_gradient_carries_label_noise_scaled_to_the_largest(engine):
    """U-shaped plan: the gradient the edge sends back for its last segment's input."""
    a, y = torch.randn(256, 128), torch.randint(0, 10, (256,))

    def returned(label_noise: float) -> torch.Tensor:
        edge, _ = _edge(engine, label_noise=label_noise)
        torch.manual_seed(1)
        hop = Hop("turnaround" if engine == "relay" else "loss", 2, "edge")
        if engine == "relay":
            return edge.train_hop(hop, a, y, 0.0).output
        x = a.clone().requires_grad_()
        return torch.autograd.grad(edge.train_hop(hop, x, y, 0.0).loss, x)[0]

    clean, noisy = returned(0.0), returned(2.0)
    largest = clean.norm(dim=1).max()
    assert abs((noisy - clean).std() - 2.0 * largest / 128 ** 0.5) < 0.05 * largest / 128 ** 0.5


def test_epsilon_is_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.5 / 2, 1.0, 6)]  # noise 1.5 x clip on sensitivity 2 x clip; each sample once an epoch
    assert epsilon(PrivacyConfig(clip=1.0, noise=1.5), 6) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)
    assert epsilon(PrivacyConfig(), 6) is None


def test_the_label_attack_on_a_model_that_learned_nothing_scores_the_largest_class():
    """A diverged edge (say, too strong a NoPeek) sends back identical or non-finite gradients: the
    audit says the attacker learns nothing from them rather than failing."""
    from split_trainer.privacy.attacks import kmeans, matched_accuracy

    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    for points in (torch.ones(10, 4), torch.full((10, 4), float("nan"))):
        assert matched_accuracy(kmeans(points, 3, seed=0), labels, 3) == pytest.approx(0.6)
    separable = torch.nn.functional.one_hot(labels, 3).float() * 10
    assert matched_accuracy(kmeans(separable, 3, seed=0), labels, 3) == 1.0


AUDIT = ["--public", "1000", "--private", "400", "--reidentify", "60", "--candidates", "30", "--decoder-epochs", "6",
         "--inversions", "4", "--inversion-steps", "60", "--unsplit", "8", "--unsplit-rounds", "5"]


@pytest.mark.parametrize("bad, says", [(["--public", "0"], "--public: must be a whole number of at least 1"),
                                       (["--private", "10"], "--reidentify 200 is more than the --private 10")])
def test_the_audit_refuses_counts_that_would_report_nan(in_process, tmp_path, bad, says):
    code, out, err = in_process("audit", "--checkpoint", str(tmp_path), *bad)
    assert code == 2 and says in (out + err).splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_audit_finds_the_leak_of_an_undefended_cut(trained_run, mnist_root, tmp_path):
    run_dir, _ = trained_run
    result = run([sys.executable, "-m", "split_trainer", "audit", "--checkpoint", str(run_dir / "checkpoints"), "--set",
                  f"data.root={mnist_root}", "--out", str(tmp_path), *AUDIT], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "audit.json").read_text())
    decoder = report["cuts"]["after pool"]["decoder"]
    assert decoder["ssim"] > decoder["class_mean_ssim"] + 0.1, decoder
    assert decoder["reidentified"] > 10 * decoder["chance"], decoder
    assert (tmp_path / "audit.png").stat().st_size > 1000 and "re-id" in result.stdout


EDGES = {"privacy.edge_weights": "edges", "data.placement": "edge", "model.plan": U_PLAN, "data.limit_train": 4096,
         "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10, "train.seed": 3}


@pytest.mark.slow
def test_edge_held_weights_stay_on_the_edges_and_resume_exactly(mnist_root, tmp_path):
    """U-shaped, edge data, edge-held weights: nothing of an edge's data or weights reaches the
    central; each edge's parts are on its own disk; a killed edge resumes to the same end; the parts
    merge for export; and the audit's label attack beats chance (no label defence)."""
    untouched = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path / "a", edges=2, **EDGES)))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    reference = json.loads((tmp_path / "a" / "summary.json").read_text())
    for name, traffic in reference["bytes"]["per_edge"].items():
        for kind in ("inputs", "labels", "edge_state"):
            assert traffic["sent"][kind] == traffic["received"][kind] == 0, (name, kind)
    checkpoints = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "step_00000064").iterdir()) == ["central.pt", "manifest.json"]
    for edge in ("edge1", "edge2"):
        assert (checkpoints / "edges" / edge / "step_00000064" / f"{edge}.pt").is_file()
    assert not (tmp_path / "a" / "model.pt").exists()

    killed = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path / "b", edges=2, **EDGES), max_restarts=2),
                 env=child_env(SPLIT_TRAINER_FAULT="edge1:train:45:kill"))
    assert killed.returncode == 0, killed.stdout[-4000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["restarts"] == 1 and abs(summary["test_loss"] - reference["test_loss"]) < 1e-6

    exported = run([sys.executable, "-m", "split_trainer", "export", "--checkpoint", str(checkpoints), "--out",
                    str(tmp_path / "model.pt")], timeout=120)
    assert exported.returncode == 0, exported.stdout
    state = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert {"conv1.weight", "fc1.weight", "fc2.weight"} <= set(state)

    audit = run([sys.executable, "-m", "split_trainer", "audit", "--checkpoint", str(checkpoints), "--set",
                 f"data.root={mnist_root}", "--out", str(tmp_path / "audit"), *AUDIT], timeout=600)
    assert audit.returncode == 0, audit.stdout[-3000:]
    labels = json.loads((tmp_path / "audit" / "audit.json").read_text())["labels"]
    assert labels["from the returned gradients"]["accuracy"] > labels["chance"] + 0.3, labels
