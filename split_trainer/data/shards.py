"""Edge-held data (``data.placement: edge``): each edge's shard of the data set found at its own
``data.root``, and the batches it reads from it when the central asks.

Shards are carved the same way on every edge, from the seed alone, so that on one machine (where
every edge finds the same files) they are disjoint and cover the data set: ``iid`` deals a seeded
permutation out in equal parts; ``dirichlet`` draws, per class, the edges' shares from a
Dirichlet(alpha) distribution (the usual non-IID benchmark); ``local`` keeps everything an edge
finds, for real deployments where every host holds its own files. The test split is cut with the
same per-class shares, so each edge is evaluated on data distributed like its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from split_trainer.config import ConfigError, DataConfig
from split_trainer.core.errors import EdgeRefusal
from split_trainer.data.batches import batch_loader, crop_flip, epoch_order, index_batches
from split_trainer.data.datasets import Source

Tensor = torch.Tensor


@dataclass(frozen=True)
class ShardBatch:
    """The central's request for an edge's own batch: which split, epoch and batch of its shard,
    and whether the labels come back with the activation (only when the loss is on the central)."""
    split: str
    epoch: int
    index: int
    labels: bool


def _counts(labels: Tensor, classes: int) -> list[int]:
    return torch.bincount(labels, minlength=classes).tolist()


def _dirichlet(classes: int, edges: int, alpha: float, rng: random.Random) -> list[list[float]]:
    """Per class, the edges' shares: normalised Gamma(alpha) draws (a Dirichlet(alpha) sample)."""
    shares = []
    for _ in range(classes):
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(edges)]
        total = sum(draws) or 1.0
        shares.append([d / total for d in draws])
    return shares


def _split_by_shares(labels: Tensor, shares: list[list[float]], gen: torch.Generator) -> list[Tensor]:
    edges = len(shares[0])
    parts: list[list[Tensor]] = [[] for _ in range(edges)]
    for c, share in enumerate(shares):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = [round(sum(share[:k + 1]) * len(idx)) for k in range(edges)]
        for k, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds)):
            parts[k].append(idx[lo:hi])
    return [torch.cat(p).sort().values for p in parts]


def partition(train_labels: Tensor, test_labels: Tensor, edges: int, cfg: DataConfig, seed: int,
              min_size: int) -> list[tuple[Tensor, Tensor]]:
    """(train indices, test indices) of every edge's shard."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    if cfg.partition == "iid":
        train = torch.randperm(len(train_labels), generator=gen).tensor_split(edges)
        test = torch.randperm(len(test_labels), generator=gen).tensor_split(edges)
        return [(a.sort().values, b.sort().values) for a, b in zip(train, test)]
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    rng = random.Random(seed)
    for _ in range(1000):  # small alpha can leave an edge (nearly) empty: draw again
        shares = _dirichlet(classes, edges, cfg.dirichlet_alpha, rng)
        train = _split_by_shares(train_labels, shares, gen)
        if min(len(t) for t in train) >= min_size:
            return list(zip(train, _split_by_shares(test_labels, shares, gen)))
    raise ConfigError(f"data.dirichlet_alpha={cfg.dirichlet_alpha:g} leaves some edge fewer than {min_size} "
                      f"training samples in 1000 draws: raise data.dirichlet_alpha or use fewer edges")


class Shard:
    """One edge's training and test samples, the batches it reads from them, and where it stands
    in its own training data (saved in the edge's checkpoint part)."""
    calls = ()  # it answers no call of its own (data.placement.EdgeSide)

    def __init__(self, train: Source, test: Source, edge: int, cfg: DataConfig, seed: int, classes: int = 0,
                 label_counts: bool = False, labels_leave: bool = False):
        self.train, self.test, self.cfg, self.classes, self.edge = train, test, cfg, classes, edge
        self.label_counts = label_counts  # held() tells the central the per-class counts (data.share_label_counts)
        self.labels_leave = labels_leave  # the edge's own plan has the loss on the central (placement.labels_leave)
        self.seed = seed * 1_009 + edge  # each edge its own batch order
        self.position = (0, 0)  # (epoch, next batch) of the training data
        self._order: tuple[int, list[Tensor]] | None = None
        self._ahead: tuple[tuple[int, int], Iterator] | None = None  # workers decoding the next batches

    @classmethod
    def carve(cls, train: Source, test: Source, edge: int, edges: int, cfg: DataConfig, seed: int,
              classes: int = 0, label_counts: bool = False, labels_leave: bool = False) -> "Shard":
        """Edge ``edge`` (1..N) of ``edges``: its part of (train, test) under ``cfg.partition``;
        ``label_counts``: whether ``held`` gives the central its per-class counts; ``labels_leave``:
        whether a batch's labels may go to the central with its activation."""
        if cfg.partition != "local":
            train_idx, test_idx = partition(train.labels, test.labels, edges, cfg, seed, cfg.batch_size)[edge - 1]
            train = train.subset(train_idx)
            if not cfg.test_on_every_edge:
                test = test.subset(test_idx)
        return cls(train, test, edge, cfg, seed, classes, label_counts, labels_leave)

    def batches(self, split: str) -> int:
        size = self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size
        return -(-len(self.train if split == "train" else self.test) // size)

    def batch(self, ref: ShardBatch) -> tuple[Tensor, Tensor]:
        if ref.split == "test":
            return self.test.batch(index_batches(len(self.test), self.cfg.eval_batch_size)[ref.index])
        if self._order is None or self._order[0] != ref.epoch:
            self._order = (ref.epoch, epoch_order(len(self.train), self.cfg.batch_size, self.seed, ref.epoch))
        order = self._order[1]
        if self.cfg.num_workers == 0:
            x, y = self.train.batch(order[ref.index])
        else:  # the next reference is the next batch: workers decode ahead, a resume or a new epoch restarts them
            if self._ahead is None or self._ahead[0] != (ref.epoch, ref.index):
                self._ahead = ((ref.epoch, ref.index),
                               iter(batch_loader(self.train, order[ref.index:], self.cfg.num_workers)))
            x, y = next(self._ahead[1])
            self._ahead = ((ref.epoch, ref.index + 1), self._ahead[1])
        if self.cfg.augment == "crop_flip":
            x = crop_flip(x, self.seed, ref.epoch, ref.index)
        return x, y

    def inputs(self, ref: ShardBatch) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """The edge's side of a batch reference (placement.py): (inputs, labels, the labels to send the
        central: only when the loss is there, which the edge's own plan says, not the reference)."""
        if ref.labels and not self.labels_leave:
            raise EdgeRefusal(f"edge{self.edge} refuses to send the labels of its {ref.split} batch {ref.index}: its "
                              f"own plan keeps the labels on the edge (the loss is computed there)")
        x, y = self.batch(ref)
        if ref.split == "train":
            self.position = (ref.epoch, ref.index + 1)
        return x, y, y if ref.labels else None

    def held(self) -> dict[str, Any]:
        """What the central prints and writes to partition.json: the sizes, which it needs (an
        epoch's length), and the per-class counts only when this edge shares them: with the labels
        kept on the edges they would tell the central each edge's class mix."""
        sizes = {"train": len(self.train), "test": len(self.test), "train_batches": self.batches("train"),
                 "test_batches": self.batches("test")}
        if not self.label_counts:
            return sizes
        return {**sizes, "train_labels": _counts(self.train.labels, self.classes),
                "test_labels": _counts(self.test.labels, self.classes)}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "next_batch": self.position[1], "train_samples": len(self.train),
                "test_samples": len(self.test)}

    def load_state(self, saved: dict[str, Any]) -> None:
        """Continue at the saved position; refuse a shard that is not the one the checkpoint saw."""
        now = self.state()
        for key in ("train_samples", "test_samples"):
            if saved.get(key) != now[key]:
                raise RuntimeError(f"this edge's shard has {now[key]} {key.split('_')[0]} samples, the checkpoint "
                                   f"{saved.get(key)}: the data at its data.root changed; resume with the same data")
        self.position = (saved.get("epoch", 0), saved.get("next_batch", 0))


def rotation(batches_per_edge: list[int]) -> list[tuple[int, int]]:
    """One epoch's (edge, batch of that edge) in dispatch order. Each edge's batches are spread
    evenly over the epoch (batch j of an edge with n batches goes at (j + 1/2) / n of the way), so
    every stretch of the epoch mixes every edge's data in proportion to its shard, and no edge waits
    for one with a smaller shard; with equal shards this is plain round robin."""
    slots = [((j + 0.5) / n, k, j) for k, n in enumerate(batches_per_edge) for j in range(n)]
    return [(k, j) for _, k, j in sorted(slots)]
