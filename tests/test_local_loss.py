"""train.edge_loss: local: each edge learns from its own head, only activations cross, one way, and
the edges run ahead of the central by up to train.in_flight batches (docs/thin-links.md)."""

import json

import pytest
import torch
import torch.nn.functional as F

from split_trainer.config import load_config
from split_trainer.data.batches import epoch_order
from split_trainer.data.datasets import load
from split_trainer.data.shards import Shard
from split_trainer.model.plan import plan_for
from split_trainer.records import checkpoint
from split_trainer.training.local_loss import EdgeHead

from conftest import QUICK_TEST, THREADS, quick_overrides

EXACT = {"train.threads": THREADS, "train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05,
         "model.dropout": "false",
         "train.max_steps": 12, "train.seed": 5, "train.edge_loss": "local",
         "train.local_clip": 0.3}  # small enough that the clip acts


def reference(cfg, train, steps: int, order_seed: int) -> dict[str, torch.Tensor]:
    """Local-loss training written out in one process: the segment and its head step on the head's
    loss, its gradient clipped; the rest of the model steps on its own loss on the segment's
    output, detached."""
    plan = plan_for(cfg, cfg.train.seed)
    edge, central = plan.segments[0].module, plan.segments[1].module
    head = EdgeHead(cfg.train, edge, plan.image, plan.shape["num_classes"], torch.device("cpu")).module  # first weights
    lower = torch.optim.SGD([*edge.parameters(), *head.parameters()], lr=cfg.train.lr)
    upper = torch.optim.SGD(central.parameters(), lr=cfg.train.lr)
    for idx in epoch_order(len(train), cfg.data.batch_size, order_seed, 0)[:steps]:
        x, y = train.batch(idx)
        activation = edge(x)
        for loss, optimizer in ((F.cross_entropy(head(activation), y), lower),
                                (F.cross_entropy(central(activation.detach()), y), upper)):
            optimizer.zero_grad()
            loss.backward()
            if optimizer is lower:
                torch.nn.utils.clip_grad_norm_([*edge.parameters(), *head.parameters()], cfg.train.local_clip)
            optimizer.step()
    return plan.full.state_dict()


@pytest.mark.parametrize("placement", ["central", "edge"])
@pytest.mark.parametrize("in_flight", [1, 5])
def test_local_loss_training_equals_its_single_process_reference(loopback, tmp_path, placement, in_flight):
    """1 edge, no dropout, plain SGD: the parameters equal the reference on the same batches, in
    either placement (central: the labels go down with the inputs), however far the edge runs
    ahead: nothing the edge computes depends on the central's pace."""
    summary = loopback(tmp_path, 1, **EXACT, **{"data.placement": placement, "train.in_flight": in_flight})
    cfg = load_config(tmp_path / "config.yaml")
    train, test, _ = load(cfg.data)
    seed = cfg.train.seed
    if placement == "edge":
        shard = Shard.carve(train, test, 1, 1, cfg.data, seed)
        train, seed = shard.train, shard.seed
    expected = reference(cfg, train, 12, seed)
    split = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert split.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(split[key], expected[key], rtol=0, atol=1e-5, msg=key)
    labels = summary["bytes"]["per_edge"]["edge1"]["sent" if placement == "central" else "received"]["labels"]
    # Central placement: down, for the edge's head; edge placement: up, for the central's loss and
    # its score of the test images.
    assert labels == 12 * 64 * 8 + (QUICK_TEST * 8 if placement == "edge" else 0)


def test_only_activations_cross_one_way_in_the_wire_type_and_bottleneck(loopback, tmp_path):
    """3 edges in edge placement, int8 behind bottleneck 8, four batches in flight: the cut carries
    exactly 8x12x12 one-byte values and a scale per sample up, and no gradient byte comes down."""
    steps = 30
    summary = loopback(tmp_path, 3, **{"train.edge_loss": "local", "train.in_flight": 4, "data.placement": "edge",
                                       "rpc.activation_dtype": "int8", "model.bottleneck": 8,
                                       "train.max_steps": steps, "train.edge_sync_every": 10})
    assert summary["bytes"]["per_cut"] == {"after pool_down": {"forward": steps * 64 * (8 * 12 * 12 + 4),
                                                               "backward": 0}}
    for name, traffic in summary["bytes"]["per_edge"].items():
        assert traffic["sent"]["activation_grads"] == traffic["received"]["activation_grads"] == 0, name
        assert traffic["sent"]["inputs"] == traffic["sent"]["labels"] == 0, name  # the data stays on the edge
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    for kind in ("loss", "edge_loss"):  # the central's, and the mean of the edges' own heads'
        losses = [record[kind] for record in logged]
        assert losses[-1] < 0.8 * losses[0], (kind, losses)


def test_a_local_loss_run_stopped_at_a_checkpoint_resumes_to_the_untouched_run(loopback, tmp_path):
    """2 edges keeping their own weights, dropout on, three in flight: 6 steps, then on to 12, ends
    with the untouched run's test loss; each edge's own part holds its head."""
    keys = {"train.edge_loss": "local", "train.in_flight": 3, "data.placement": "edge",
            "privacy.edge_weights": "edges", "train.edge_sync_every": 3, "checkpoint.every_steps": 3, "train.seed": 3}
    untouched = loopback(tmp_path / "a", 2, "--resume", "never", **keys, **{"train.max_steps": 12})
    loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 6})
    resumed = loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 12})
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 12
    assert resumed["test_loss"] == pytest.approx(untouched["test_loss"], abs=1e-6)
    for name in ("edge1", "edge2"):
        a, b = (checkpoint.find_resumable(tmp_path / run / "checkpoints" / "edges" / name, warn=pytest.fail).parts[name]
                for run in "ab")
        assert set(a["head"]) == {"module", "optimizer"}
        for key in a["head"]["module"]:
            torch.testing.assert_close(b["head"]["module"][key], a["head"]["module"][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("keys, says", [
    ({"model.plan": "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"},
     "train.edge_loss=local needs a single-cut plan (edge, then central), got edge -> central -> edge"),
    ({"train.engine": "autograd"}, "train.edge_loss=local needs train.engine=relay"),
    ({"train.in_flight": 9}, "train.in_flight must be a whole number from 1 to 8 with train.edge_loss=local"),
    ({"train.edge_loss": "central", "train.in_flight": 4},
     "train.in_flight must be a whole number from 1 to 3 with train.edge_loss=central, got 4")])
def test_what_a_local_loss_cannot_do_is_refused_in_one_line(in_process, mnist_root, tmp_path, keys, says):
    code, out, err = in_process(*quick_overrides(mnist_root, tmp_path, 2, **{"train.edge_loss": "local", **keys}))
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
