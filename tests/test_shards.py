"""Edge-held shards: disjoint, covering, seeded; the epoch's dispatch order over unequal shards."""

import pytest
import torch

from split_trainer.config import ConfigError, DataConfig
from split_trainer.data.datasets import load
from split_trainer.data.shards import Shard, ShardBatch, partition, rotation


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load(DataConfig(root=str(mnist_root)))[:2]


@pytest.mark.parametrize("how", ["iid", "dirichlet"])
def test_shards_are_disjoint_cover_the_data_and_repeat_for_the_same_seed(mnist, how):
    train, test = mnist
    cfg = DataConfig(partition=how, dirichlet_alpha=0.5)
    shards = partition(train.labels, test.labels, 3, cfg, seed=1, min_size=64)
    for split, labels in ((0, train.labels), (1, test.labels)):
        everything = torch.cat([s[split] for s in shards])
        assert len(everything) == len(labels) and len(torch.unique(everything)) == len(labels)  # disjoint, covering
    again = partition(train.labels, test.labels, 3, cfg, seed=1, min_size=64)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(shards, again))
    other = partition(train.labels, test.labels, 3, cfg, seed=2, min_size=64)
    assert not torch.equal(shards[0][0], other[0][0])
    sizes = [len(s[0]) for s in shards]
    if how == "iid":
        assert max(sizes) - min(sizes) <= 1
    else:  # non-IID: label mixes differ between edges
        mixes = [torch.bincount(train.labels[s[0]], minlength=10).float() / len(s[0]) for s in shards]
        assert max((mixes[0] - m).abs().max().item() for m in mixes[1:]) > 0.1


def test_each_edge_is_tested_on_data_distributed_like_its_own(mnist):
    train, test = mnist
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.3, limit_train=None)
    shard = Shard.carve(train, test, 2, 3, cfg, seed=4)
    train_mix = torch.bincount(shard.train.labels, minlength=10).float() / len(shard.train)
    test_mix = torch.bincount(shard.test.labels, minlength=10).float() / len(shard.test)
    assert (train_mix - test_mix).abs().max() < 0.05
    whole = Shard.carve(train, test, 2, 3, DataConfig(partition="dirichlet", test_on_every_edge=True), seed=4)
    assert len(whole.test) == len(test)


def test_an_edge_draws_the_same_batch_for_the_same_seed_epoch_and_index(mnist):
    train, test = mnist
    a = Shard.carve(train, test, 1, 2, DataConfig(), seed=1)
    b = Shard.carve(train, test, 1, 2, DataConfig(), seed=1)
    x1, y1 = a.batch(ShardBatch("train", 3, 7, True))
    a.batch(ShardBatch("train", 4, 0, True))  # another epoch in between changes nothing
    x2, y2 = b.batch(ShardBatch("train", 3, 7, True))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and len(y1) == 64
    assert not torch.equal(a.batch(ShardBatch("train", 0, 7, True))[1], y1)


def test_tiny_alpha_that_starves_an_edge_is_a_config_error(mnist):
    train, test = mnist
    with pytest.raises(ConfigError, match="raise data.dirichlet_alpha"):
        partition(train.labels[:200], test.labels[:50], 8, DataConfig(partition="dirichlet", dirichlet_alpha=0.01),
                  seed=1, min_size=64)


def test_the_dispatch_order_spreads_each_edges_batches_over_the_epoch():
    assert rotation([3, 3]) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # equal shards: round robin
    order = rotation([2, 4, 1])
    assert order == [(1, 0), (0, 0), (1, 1), (2, 0), (1, 2), (0, 1), (1, 3)]
    assert sorted(rotation([5, 3])) == sorted([(0, j) for j in range(5)] + [(1, j) for j in range(3)])
    big = rotation([100, 10])  # the small edge's batches are spread out, not bunched at the start
    positions = [i for i, (k, _) in enumerate(big) if k == 1]
    assert positions[0] < 10 and positions[-1] > 95


def test_an_edge_tells_the_central_its_label_counts_only_when_asked(mnist):
    train, test = mnist
    cfg = DataConfig(partition="dirichlet", dirichlet_alpha=0.5)
    kept = Shard.carve(train, test, 1, 2, cfg, seed=1, classes=10).held()
    assert kept == {"train": kept["train"], "test": kept["test"], "train_batches": -(-kept["train"] // 64),
                    "test_batches": -(-kept["test"] // 1000)}  # sizes: what an epoch's length needs
    shared = Shard.carve(train, test, 1, 2, cfg, seed=1, classes=10, label_counts=True)
    assert shared.held()["train_labels"] == torch.bincount(shared.train.labels, minlength=10).tolist()


@pytest.mark.parametrize("keys, shared", [
    ([], True),  # the loss is on the central, which holds the edge weights: it sees the labels anyway
    (["model.plan=[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"], False),
    (["privacy.edge_weights=edges"], False),
    (["privacy.edge_weights=edges", "data.share_label_counts=true"], True),
    (["data.share_label_counts=false"], False)])
def test_label_counts_stay_home_with_a_u_shaped_plan_or_edge_held_weights_unless_asked(keys, shared):
    from split_trainer.config import load_config
    from split_trainer.data.placement import shares_label_counts

    assert shares_label_counts(load_config(None, ["data.placement=edge", *keys])) is shared
