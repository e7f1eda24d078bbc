import pytest
import torch

from split_trainer.config import ConfigError, ModelConfig, load_config
from split_trainer.model.plan import build_plan, layout_text

from conftest import TUTORIAL_PLAN

MNIST = {"in_channels": 1, "image_size": 28, "num_classes": 10}


def test_segments_compose_to_the_full_model():
    plan = build_plan(ModelConfig(), MNIST, seed=3)
    plan.full.eval()
    x = torch.randn(5, 1, 28, 28)
    edge, head = (s.module for s in plan.segments)
    activation = edge(x)
    assert activation.shape == (5, 64, 12, 12)
    torch.testing.assert_close(head(activation), plan.full(x), rtol=0, atol=0)


def test_layout_places_the_conv_segment_on_the_edge():
    plan = build_plan(ModelConfig(), MNIST, seed=0)
    assert plan.layout == [("edge", ("conv1", "relu1", "conv2", "relu2", "pool")),
                           ("central", ("dropout1", "flatten", "fc1", "relu3", "dropout2", "fc2"))]
    keys = set(plan.segments[0].module.state_dict()) | set(plan.segments[1].module.state_dict())
    assert keys == set(plan.full.state_dict())


def test_same_seed_same_weights_other_split_point():
    a = build_plan(ModelConfig(split="relu1"), MNIST, seed=7)
    b = build_plan(ModelConfig(), MNIST, seed=7)
    assert a.layout[0][1] == ("conv1", "relu1")
    for (ka, va), (kb, vb) in zip(a.full.state_dict().items(), b.full.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_the_tutorials_alternating_plan():
    cfg = load_config(None, ["model.name=tutorial_cnn", f"model.plan={TUTORIAL_PLAN}"])
    assert cfg.model.split is None  # the plan says where every layer runs
    plan = build_plan(cfg.model, MNIST, seed=0)
    assert plan.places == ["edge", "central", "edge", "central"] and plan.cuts == ["pool0", "pool1", "relu2"]
    assert layout_text(plan.layout) == "edge conv0..pool0 | central conv1..pool1 | edge conv2..relu2 | central avgpool..fc"
    x = torch.randn(3, 1, 28, 28)
    shapes = []
    for segment in plan.segments:
        x = segment.module(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(16, 7, 7), (32, 2, 2), (64, 1, 1), (10,)]  # the tutorial's Layer_0..Layer_3
    assert sum(p.numel() for p in plan.full.parameters()) == 160 + 4640 + 18496 + 650


@pytest.mark.parametrize("cfg, words", [(ModelConfig(name="resnet"), "not registered"),
                                        (ModelConfig(split="fc2"), "that can end the edge"),
                                        (ModelConfig(split="nope"), "choose one of")])
def test_bad_model_config(cfg, words):
    with pytest.raises(ConfigError, match=words):
        build_plan(cfg, MNIST, seed=0)


@pytest.mark.parametrize("plan, words", [
    ("[{place: edge, until: pool0}, {place: edge, until: pool1}, {place: central}]",
     "segments 1 and 2 both run on the edge: places must alternate"),
    ("[{place: edge, until: pool0}, {place: central, until: pool9}, {place: edge}]",
     "segment 2: until 'pool9' is not a layer of tutorial_cnn"),
    ("[{place: edge, until: pool1}, {place: central, until: pool0}, {place: edge}]",
     "segment 2: until 'pool0' does not come after 'pool1'"),
    ("[{place: edge, until: pool0}, {place: central, until: relu2}]",
     "leaves layers avgpool, flatten, fc of tutorial_cnn to no segment"),
    ("[{place: central, until: pool0}, {place: edge}]", "the first segment runs on central"),
    ("[{place: edge, until: pool0}]", "at least two segments"),
    ("[{place: edge}, {place: central}]", "segment 1 needs until"),
    ("[{place: cloud, until: pool0}, {place: central}]", "place must be edge or central"),
])
def test_bad_plans_name_the_problem(plan, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        build_plan(load_config(None, ["model.name=tutorial_cnn", f"model.plan={plan}"]).model, MNIST, seed=0)
