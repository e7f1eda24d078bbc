"""Attacker-aware training (privacy.adversary): the edge's own decoder pushes its segment the way
that makes the decoder worse, only above its threshold, with both engines; it lives in the edge's
own checkpoint part, resumes exactly, and is refused where the central would hold it."""

import json

import pytest
import torch

from split_trainer.config import ConfigError, PrivacyConfig, TrainConfig, load_config
from split_trainer.core.hops import Hop, HopKind
from split_trainer.model.plan import build_plan
from split_trainer.privacy.adversary import Adversary
from split_trainer.privacy.attacks import ssim
from split_trainer.privacy.defences import Defences
from split_trainer.records import checkpoint
from split_trainer.training.engines import ENGINES
from split_trainer.training.stage import Stage

from conftest import quick_overrides

MNIST = {"in_channels": 1, "image_size": 28, "num_classes": 10}
U_PLAN = "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"
PRIVATE = {"data.placement": "edge", "privacy.edge_weights": "edges", "model.plan": U_PLAN}


def _images(n: int = 32) -> torch.Tensor:
    """Blobs of light on dark, normalised as MNIST is: something a decoder can learn quickly."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij"))
    centres = torch.randint(6, 22, (n, 2, 1, 1), generator=gen).float()
    pixels = torch.exp(-((grid - centres) ** 2).sum(1, keepdim=True) / 20)
    return (pixels - 0.1307) / 0.3081


def _adversary(threshold: float) -> tuple[Adversary, torch.nn.Module]:
    plan = build_plan(load_config(None, []).model, MNIST, seed=0)
    segment = plan.segments[0].module
    return Adversary(PrivacyConfig(edge_weights="edges", adversary=1.0, adversary_ssim=threshold), segment,
                     (1, 28, 28), seed=0, device=torch.device("cpu")), segment


def test_the_adversary_pushes_the_activation_where_its_decoder_does_worse_and_only_above_the_threshold():
    x = _images()
    adversary, segment = _adversary(threshold=-0.99)
    z = segment(x).detach()
    for _ in range(30):  # the decoder learns these images
        extra = adversary.gradient(x, z)
    assert adversary.last_ssim > -0.99 and extra.norm() > 0
    span = float(x.max() - x.min())
    with torch.no_grad():
        before = ssim(adversary.decoder(z), x, span).mean()
        after = ssim(adversary.decoder(z - 0.5 * extra / extra.norm() * z.norm()), x, span).mean()
    assert after < before  # following the term's gradient downhill makes the edge's decoder worse

    quiet, segment = _adversary(threshold=0.99)  # a decoder far from 0.99: nothing to push
    assert torch.equal(quiet.gradient(x, segment(x).detach()), torch.zeros_like(z))


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_the_adversary_term_reaches_the_edge_weights_with_both_engines(engine):
    """With nothing coming back from the central, the first segment's weights get exactly the
    adversary's gradient; its decoder took one step per training forward and none in evaluation."""
    cfg = load_config(None, [f"model.plan={U_PLAN}", f"train.engine={engine}"])
    plan = build_plan(cfg.model, MNIST, seed=0)
    privacy = PrivacyConfig(edge_weights="edges", adversary=2.0, adversary_ssim=-0.99)
    adversary = Adversary(privacy, plan.segments[0].module, (1, 28, 28), seed=0, device=torch.device("cpu"))
    train = TrainConfig(engine=engine)
    edge = ENGINES[engine].build(train, plan.places, Stage(plan.on("edge"), train), None,
                                 Defences(privacy, plan.places, adversary))
    x = _images()
    edge.run(Hop(HopKind.INFER, 0, "edge"), x, None, 0.0)
    assert int(adversary.optimizer.state_dict()["state"].get(0, {}).get("step", 0)) == 0  # evaluation: no step
    reply = edge.train_hop(Hop(HopKind.FORWARD, 0, "edge"), x, None, 0.0)
    assert int(adversary.optimizer.state_dict()["state"][0]["step"]) == 1
    out = edge.pending[0][-1][1] if engine == "relay" else reply.output
    conv = plan.segments[0].module.conv1.weight
    got = torch.autograd.grad(out, conv, torch.zeros_like(out))[0]
    assert got.norm() > 0  # the adversary's term alone moved the segment


def test_the_adversary_needs_edge_held_weights():
    with pytest.raises(ConfigError, match="privacy.adversary needs privacy.edge_weights: edges"):
        load_config(None, ["privacy.adversary=1"])


@pytest.mark.parametrize("engine, in_flight", [("relay", 2), pytest.param("autograd", 1, marks=pytest.mark.slow)])
def test_a_run_with_the_adversary_resumes_to_the_untouched_run_and_keeps_its_decoder_home(
        in_process, mnist_root, tmp_path, engine, in_flight):
    """2 edges, edge data, U-shaped, dropout on: 4 steps, then the same command to 8, ends with the
    parameters, decoders and test loss of one run of 8 steps; each decoder is in its edge's own
    part and nowhere in the central's checkpoint."""
    keys = {**PRIVATE, "privacy.adversary": 1.0, "train.engine": engine, "train.in_flight": in_flight,
            "topology.transport": "loopback", "train.edge_sync_every": 2, "checkpoint.every_steps": 4,
            "train.seed": 3, "data.limit_test": 256}

    def train(run_dir, steps, *argv):
        code, out, err = in_process(*argv, *quick_overrides(mnist_root, run_dir, 2, **keys, **{"train.max_steps": steps}))
        assert code == 0, (out + err)[-3000:]
        return json.loads((run_dir / "summary.json").read_text())

    untouched = train(tmp_path / "a", 8, "--resume", "never")
    train(tmp_path / "b", 4)
    resumed = train(tmp_path / "b", 8)
    assert resumed["resumed_from_step"] == 4
    assert resumed["test_loss"] == pytest.approx(untouched["test_loss"], abs=1e-6)
    parts = {}
    for run in "ab":
        folder = tmp_path / run / "checkpoints"
        central = checkpoint.load(folder / "step_00000008")
        assert set(central.parts) == {"central"} and "adversary" not in central.parts["central"]
        parts[run] = {e: checkpoint.load(folder / "edges" / e / "step_00000008").parts[e] for e in ("edge1", "edge2")}
    for edge in ("edge1", "edge2"):
        a, b = parts["a"][edge], parts["b"][edge]
        for key in a["module"]:
            torch.testing.assert_close(b["module"][key], a["module"][key], rtol=0, atol=1e-6, msg=key)
        assert a["adversary"]["decoder"].keys() == b["adversary"]["decoder"].keys()
        for key, value in a["adversary"]["decoder"].items():
            torch.testing.assert_close(b["adversary"]["decoder"][key], value, rtol=0, atol=1e-6, msg=key)
