"""model.bottleneck: a learned down-projection at the end of every edge segment that sends to the
central and the matching up-projection at the start of the central's; null changes nothing."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from split_trainer.config import ConfigError, ModelConfig, load_config
from split_trainer.data.datasets import load
from split_trainer.model import models
from split_trainer.model.model_file import build_model
from split_trainer.model.plan import build_plan, layout_text
from split_trainer.training.local import train_local

from conftest import quick_overrides
from test_loopback import EXACT, PLANS, model_of, records

MNIST = {"in_channels": 1, "image_size": 28, "num_classes": 10}


@pytest.mark.parametrize("shape", [pytest.param("single cut", marks=pytest.mark.slow), "u-shaped"])
def test_the_cut_carries_the_bottlenecks_bytes_and_the_run_learns(loopback, tmp_path, shape):
    """k=8 after pool: 8x12x12 float32 per sample each way (64x12x12 without), on the edge->central
    cut only: the U-shaped plan's central->edge cut still carries fc1's 128 values."""
    steps, k = 24, 8
    placement = "edge" if shape == "u-shaped" else "central"
    summary = loopback(tmp_path, 2, **PLANS[shape], **{"train.max_steps": steps, "model.bottleneck": k,
                                                      "data.placement": placement})
    per_sample = k * 12 * 12 * 4
    expected = {"after pool_down": {"forward": steps * 64 * per_sample, "backward": steps * 64 * per_sample}}
    if shape == "u-shaped":
        expected["after dropout2"] = {"forward": steps * 64 * 128 * 4, "backward": steps * 64 * 128 * 4}
    assert summary["bytes"]["per_cut"] == expected
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert all(loss == loss for loss in losses) and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("shape, added", [("single cut", {"pool_down", "pool_up"}),
                                          ("alternating", {"pool0_down", "pool0_up", "relu2_down", "relu2_up"})])
def test_split_training_with_a_bottleneck_equals_local_training(loopback, tmp_path, shape, added):
    """The bottleneck's layers are the plan's, so single-process training (the reference) has them
    too; in the alternating plan at both cuts an edge sends from (a feature map and a vector)."""
    loopback(tmp_path, 1, **EXACT, **PLANS[shape], **{"model.bottleneck": 4})
    cfg = load_config(tmp_path / "config.yaml")
    local = train_local(cfg, load(cfg.data)[0], steps=12).state_dict()
    split = model_of(tmp_path)
    assert {f"{layer}.weight" for layer in added} <= split.keys() and split.keys() == local.keys()
    for key in local:
        torch.testing.assert_close(split[key], local[key], rtol=0, atol=1e-5, msg=key)


def test_without_a_bottleneck_the_model_is_build_fulls_and_with_one_the_old_layers_keep_their_weights():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        reference = models.build_full(ModelConfig(), MNIST)
        rng = torch.get_rng_state()
    plain, narrow = build_plan(ModelConfig(), MNIST, seed=11), build_plan(ModelConfig(bottleneck=8), MNIST, seed=11)
    assert list(plain.full._modules) == list(reference._modules)
    assert torch.equal(plain.rng_after_init, rng)
    expected = reference.state_dict()
    for state in (plain.full.state_dict(), narrow.full.state_dict()):
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
    assert plain.full.state_dict().keys() == expected.keys()
    assert set(narrow.full.state_dict()) - set(expected) == {"pool_down.weight", "pool_down.bias",
                                                            "pool_up.weight", "pool_up.bias"}
    assert not torch.equal(narrow.rng_after_init, rng)  # taken after the bottleneck's draws


def test_a_feature_map_gets_1x1_convolutions_and_a_vector_linear_layers():
    plan = build_plan(ModelConfig(bottleneck=8), MNIST, seed=0)
    assert layout_text(plan.layout) == "edge conv1..pool_down | central pool_up..fc2" and plan.cuts == ["pool_down"]
    down, up = plan.full.pool_down, plan.full.pool_up
    assert isinstance(down, nn.Conv2d) and (down.in_channels, down.out_channels, down.kernel_size) == (64, 8, (1, 1))
    assert isinstance(up, nn.Conv2d) and (up.in_channels, up.out_channels) == (8, 64)
    plan = build_plan(ModelConfig(split="relu3", bottleneck=16), MNIST, seed=0)
    assert plan.layout[0][1][-2:] == ("relu3", "relu3_down") and plan.layout[1][1][0] == "relu3_up"
    down, up = plan.full.relu3_down, plan.full.relu3_up
    assert isinstance(down, nn.Linear) and (down.in_features, down.out_features) == (128, 16)
    assert isinstance(up, nn.Linear) and (up.in_features, up.out_features) == (16, 128)
    x = torch.randn(3, 1, 28, 28)
    edge, central = (s.module for s in plan.segments)
    assert edge(x).shape == (3, 16)
    plan.full.eval()
    torch.testing.assert_close(central(edge(x)), plan.full(x), rtol=0, atol=0)


def test_the_shape_probe_leaves_batchnorm_training_and_another_shape_is_one_line(monkeypatch):
    cfg = ModelConfig(name="resnet_small", args={"blocks": 1}, split="stage1", bottleneck=4)
    plan = build_plan(cfg, MNIST, seed=0)
    assert all(m.training for m in plan.full.modules())
    assert plan.full.stage1_down.out_channels == 4 and plan.full.stage1_down.in_channels == 16

    def sequence_model(cfg, shape):  # (N, 4, 676) after "rows": neither a feature map nor a vector
        return nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3)), ("rows", nn.Flatten(2)),
                                          ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * 26 * 26, 10))]))
    monkeypatch.setitem(models._REGISTRY, "sequence_model", sequence_model)
    with pytest.raises(ConfigError, match=r"after 'rows' is \(4, 676\) per sample, neither a feature map"):
        build_plan(ModelConfig(name="sequence_model", split="rows", bottleneck=2), MNIST, seed=0)


def test_a_model_file_with_a_bottleneck_is_rebuilt():
    cfg = ModelConfig(bottleneck=8)
    plan = build_plan(cfg, MNIST, seed=5)
    model = build_model(dataclasses.asdict(cfg), MNIST, plan.full.state_dict())  # what evaluate and export do
    plan.full.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(x), plan.full(x), rtol=0, atol=0)


def test_a_checkpoint_of_another_bottleneck_is_refused_before_anything_runs(loopback, in_process, mnist_root,
                                                                           tmp_path):
    loopback(tmp_path, 1, **{"train.max_steps": 5, "model.bottleneck": 8})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for other, words in [(16, "was written for bottleneck=8, but the config gives bottleneck=16"),
                         ("null", "was written for plan=edge conv1..pool_down | central pool_up..fc2, but the "
                                  "config gives plan=edge conv1..pool | central dropout1..fc2")]:
        code, out, err = in_process(*quick_overrides(mnist_root, tmp_path, 1, **{
            "topology.transport": "loopback", "train.max_steps": 10, "model.bottleneck": other}))
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
