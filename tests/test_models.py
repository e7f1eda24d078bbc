import pytest
import torch

from split_trainer.config import ConfigError, ModelConfig
from split_trainer.models import build_plan


def test_segments_compose_to_the_full_model():
    plan = build_plan(ModelConfig(), seed=3)
    plan.full.eval()
    x = torch.randn(5, 1, 28, 28)
    edge, head = (s.module for s in plan.segments)
    activation = edge(x)
    assert activation.shape == (5, 64, 12, 12)
    torch.testing.assert_close(head(activation), plan.full(x), rtol=0, atol=0)


def test_layout_places_the_conv_segment_on_the_edge():
    plan = build_plan(ModelConfig(), seed=0)
    assert plan.layout == [("edge", ("conv1", "relu1", "conv2", "relu2", "pool")),
                           ("central", ("dropout1", "flatten", "fc1", "relu3", "dropout2", "fc2"))]
    keys = set(plan.segments[0].module.state_dict()) | set(plan.segments[1].module.state_dict())
    assert keys == set(plan.full.state_dict())


def test_same_seed_same_weights_other_split_point():
    a = build_plan(ModelConfig(split="relu1"), seed=7)
    b = build_plan(ModelConfig(), seed=7)
    assert a.layout[0][1] == ("conv1", "relu1")
    for (ka, va), (kb, vb) in zip(a.full.state_dict().items(), b.full.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("cfg, words", [(ModelConfig(name="resnet"), "not registered"),
                                        (ModelConfig(split="fc2"), "that can end the edge"),
                                        (ModelConfig(split="nope"), "choose one of")])
def test_bad_model_config(cfg, words):
    with pytest.raises(ConfigError, match=words):
        build_plan(cfg, seed=0)
