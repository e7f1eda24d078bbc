"""Where the data lives (``data.placement``): one interface, one class per placement.

On the central a placement knows its steps per epoch, yields an epoch's batches from a position,
yields the evaluation shares, and describes itself for the banner and the run's files. On each
edge its counterpart (``edge_data``) turns what the central sends into inputs: the inputs
themselves (central-held data), or a reference to one of the edge's own batches (edge-held
shards).

    central  the central loads the data set and sends each batch's inputs; labels leave it only
             for a plan whose last segment is on the edge
    edge     each edge loads its own shard on its own host; the central sends batch references (epoch, batch)
             and never receives an input (nor a label when the loss is on the edge)

Both count, as batches are assigned, how often each training sample's activation has gone to the
central (``releases``, the progress record's; docs/privacy.md): a pass over a set of samples (the
data set, or one edge's shard) releases each of them once, so the most any sample of a set has been
released is the number of passes over it started (plus, after a failure, the passes redone: the
central's ledger, privacy.defences.Releases).

Another placement is one more class with the same methods, and a driver on the central
(training.drivers names each placement's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Protocol

import torch

from split_trainer.config import Config
from split_trainer.core.batch import Batch
from split_trainer.data.batches import batch_loader, crop_flip, epoch_order, index_batches
from split_trainer.data.datasets import Source, Spec, load, spec_of
from split_trainer.data.shards import Shard, ShardBatch, rotation

Tensor = torch.Tensor
Score = tuple[float, int, int]  # summed loss, correct predictions, samples
DATA = "data"
"""Central placement's one set of training samples, in the release counts: the whole data set."""


class Placement(Protocol):
    """The central's side of a placement."""
    steps_per_epoch: int

    def bind(self, reports: list[dict[str, Any]], names: list[str], served: dict[str, int],
             releases: dict[str, int]) -> None:
        """The fleet is up: ``reports`` holds every present edge's ``Edge.about``; ``served``
        counts each edge's training batches so far, by name, and ``releases`` the passes started
        over each set of training samples (both the progress record's, updated here)."""

    def batches(self, epoch: int, position: int) -> Iterator[Batch]:
        """The epoch's batches in dispatch order, from batch ``position`` on."""

    def assign(self, batch: Batch) -> Batch:
        """``batch`` as the edge ``batch.edge`` runs it (on that edge's driver thread, in order);
        counts a release where it starts a pass."""

    def passes(self, step: int) -> dict[str, tuple[int, int]]:
        """Per set of training samples this fleet trains on (each present edge's shard; central
        placement: ``DATA``), (batches served so far, batches in one pass over it), at ``step``."""

    def reach(self, span: list[Batch], any_edge: bool) -> dict[str, int]:
        """Per set of ``passes``, the most batches of ``span`` it can serve (``any_edge``: any edge
        may take any of them, under free_first or in a live fleet, which hands a leaving edge's round)."""

    def takers(self, span: list[Batch]) -> list[int]:
        """The edges that may take ``span``'s batches (horizontal placements)."""

    def eval_shares(self, epoch: int) -> list[list[tuple[int, Any]]]:
        """Per edge, its (test batch number, key) pairs; ``test_batch(key)`` gives (source, labels)."""

    def test_batch(self, key: Any) -> tuple[Any, Optional[Tensor]]: ...

    def eval_record(self, scores: dict[tuple[int, int], Score], names: list[str]) -> dict[str, Any]:
        """What the evaluation record adds to the totals."""

    def banner(self, names: list[str]) -> str:
        """The banner's data line."""

    def files(self, names: list[str]) -> dict[str, Any]:
        """The run's files that describe the data (name -> JSON content)."""


class EdgeSide(Protocol):
    """An edge's side of a placement: what it makes of the first hop's input."""
    calls: tuple[str, ...]
    """Calls of the central's that this side answers itself (its methods of those names), beside the
    edge's own (training.edge.CALLS)."""

    def inputs(self, source: Any) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """(inputs, their labels when this edge holds them, the labels to send the central)."""

    def state(self) -> dict[str, Any]:
        """Where this edge stands in its own data: saved with its checkpoint part."""

    def load_state(self, saved: dict[str, Any]) -> None: ...

    def held(self) -> Optional[dict[str, Any]]:
        """Sizes and label counts of the data this edge holds, if any."""


def _spec_text(cfg: Config, spec: Spec) -> str:
    mean, std = (", ".join(f"{v:.4f}" for v in values) for values in (spec.mean, spec.std))
    computed = " computed from the training images" if computes_statistics(cfg) else ""
    augment = f", augment {cfg.data.augment}" if cfg.data.augment != "none" else ""
    return (f"{cfg.data.name} ({spec.channels}x{spec.size}x{spec.size}, {spec.classes} classes, normalised with mean "
            f"({mean}) std ({std}){computed}{augment})")


def computes_statistics(cfg: Config) -> bool:
    return cfg.data.name == "image_folder" and cfg.data.mean is None


def edge_of(step: int, edges: int, per_sync: int, sync_every: int) -> int:
    """The edge of batch ``step`` under central placement: round robin over ``per_sync`` of the
    ``edges`` at a time, the next ``per_sync`` after every ``sync_every`` steps (train.edges_per_sync;
    0, or as many as there are edges: batch i to edge i mod N)."""
    group = per_sync if 0 < per_sync < edges else edges
    return ((step // sync_every) * group + step % group) % edges


class CentralData:
    """The central holds the data set and sends each batch's inputs to the edge whose turn it is
    (``edge_of``: batch i to edge i mod N when every edge trains between two syncs); the test
    batches are spread over every edge."""

    def __init__(self, cfg: Config, labels_here: bool):
        self.cfg = cfg
        self.train, self.test, self.spec = load(cfg.data)  # a bad folder fails here, before RPC
        self.steps_per_epoch = -(-len(self.train) // cfg.data.batch_size)
        self.test_batches = index_batches(len(self.test), cfg.data.eval_batch_size)
        self.edges = 0
        self.releases: dict[str, int] = {}

    def bind(self, reports: list[dict[str, Any]], names: list[str], served: dict[str, int],
             releases: dict[str, int]) -> None:
        self.edges, self.releases = len(reports), releases

    def batches(self, epoch: int, position: int) -> Iterator[Batch]:
        start = epoch * self.steps_per_epoch
        order = epoch_order(len(self.train), self.cfg.data.batch_size, self.cfg.train.seed, epoch)
        loader = batch_loader(self.train, order[position:], self.cfg.data.num_workers)
        for i, (x, y) in enumerate(loader, position):
            if self.cfg.data.augment == "crop_flip":
                x = crop_flip(x, self.cfg.train.seed, epoch, i)
            yield Batch(start + i, edge_of(start + i, self.edges, self.cfg.train.edges_per_sync,
                                           self.cfg.train.edge_sync_every), x, y)

    def assign(self, batch: Batch) -> Batch:
        if batch.step % self.steps_per_epoch == 0:  # an epoch is one pass over the data set
            self.releases[DATA] = self.releases.get(DATA, 0) + 1
        return batch  # the inputs are the data set's next batch, whichever edge runs them

    def passes(self, step: int) -> dict[str, tuple[int, int]]:
        return {DATA: (step, self.steps_per_epoch)}

    def reach(self, span: list[Batch], any_edge: bool) -> dict[str, int]:
        return {DATA: len(span)}

    def takers(self, span: list[Batch]) -> list[int]:
        return sorted({batch.edge for batch in span})  # the edges of this sync's turn

    def eval_shares(self, epoch: int) -> list[list[tuple[int, Any]]]:
        n = self.edges
        return [[(j, idx) for j, idx in enumerate(self.test_batches) if j % n == k] for k in range(n)]

    def test_batch(self, key: Tensor) -> tuple[Tensor, Tensor]:
        return self.test.batch(key)  # gathered (or decoded) on the driver thread that sends it

    def eval_record(self, scores: dict[tuple[int, int], Score], names: list[str]) -> dict[str, Any]:
        return {}  # every edge evaluates the same kind of data: the total says it

    def banner(self, names: list[str]) -> str:
        return (f"{_spec_text(self.cfg, self.spec)} at {self.cfg.data.root} on the central ({len(self.train)} train / "
                f"{len(self.test)} test), inputs sent to the edges")

    def files(self, names: list[str]) -> dict[str, Any]:
        return {}

    @staticmethod
    def load_on_edge(cfg: Config, edges: list[int]) -> None:
        return None  # the edge holds no data: inputs come with the calls

    @staticmethod
    def edge_data(cfg: Config, loaded: None, edge: int) -> EdgeSide:
        return CallInputs()


class EdgeData:
    """Each edge holds its own shard; the central sends batch references. An epoch is as many steps as the
    shards of the fleet that started the run hold batches (with that fleet, every edge serves its
    shard once, its batches spread evenly over the epoch: shards.rotation). Each edge goes through
    its shard at its own pace, counted by name (``served``): an edge that is away is not trained on
    and picks up where it stopped when it comes back; under free_first a fast edge takes more."""

    def __init__(self, cfg: Config, labels_here: bool):
        self.cfg, self.labels_here = cfg, labels_here  # the edges send labels only when the loss is here
        self.spec = spec_of(cfg.data)
        self.shards: list[dict[str, Any]] = []
        self.rotation: list[tuple[int, int]] = []
        self.steps_per_epoch = 0
        self.names: list[str] = []
        self.served: dict[str, int] = {}
        self.releases: dict[str, int] = {}

    def bind(self, reports: list[dict[str, Any]], names: list[str], served: dict[str, int],
             releases: dict[str, int]) -> None:
        self.shards, self.names, self.served, self.releases = [r["shard"] for r in reports], names, served, releases
        self.rotation = rotation([s["train_batches"] for s in self.shards])
        self.steps_per_epoch = len(self.rotation)

    def batches(self, epoch: int, position: int) -> Iterator[Batch]:
        start = epoch * self.steps_per_epoch  # (the central's: the run's epoch length)
        for i in range(position, self.steps_per_epoch):
            yield Batch(start + i, self.rotation[i % len(self.rotation)][0], None)

    def assign(self, batch: Batch) -> Batch:
        name, n = self.names[batch.edge], self.shards[batch.edge]["train_batches"]
        count = self.served.get(name, 0)
        self.served[name] = count + 1
        if count % n == 0:  # the edge's next pass over its shard (under free_first, or with edges away,
            # not in step with the epochs): each of its samples is released once more
            self.releases[name] = self.releases.get(name, 0) + 1
        return dataclasses.replace(batch, source=ShardBatch("train", count // n, count % n, self.labels_here))

    def passes(self, step: int) -> dict[str, tuple[int, int]]:
        return {name: (self.served.get(name, 0), s["train_batches"]) for name, s in zip(self.names, self.shards)}

    def takers(self, span: list[Batch]) -> list[int]:
        return list(range(len(self.names)))  # each runs the batch from its own shard

    def reach(self, span: list[Batch], any_edge: bool) -> dict[str, int]:
        """Round robin gives each edge its rotation's batches; under free_first (or in a live fleet) any edge may take them all."""
        return {name: len(span) if any_edge else sum(b.edge == k for b in span) for k, name in enumerate(self.names)}

    def eval_shares(self, epoch: int) -> list[list[tuple[int, Any]]]:
        return [[(j, ShardBatch("test", epoch, j, self.labels_here)) for j in range(s["test_batches"])] for s in self.shards]

    def test_batch(self, key: ShardBatch) -> tuple[ShardBatch, None]:
        return key, None  # the edge reads its own test batch

    def eval_record(self, scores: dict[tuple[int, int], Score], names: list[str]) -> dict[str, Any]:
        """Each edge's own accuracy: with non-IID shards a weak edge must not hide behind a good average."""
        per_edge = [[s for (k, _), s in scores.items() if k == e] for e in range(len(names))]
        return {"per_edge": {name: sum(s[1] for s in p) / max(sum(s[2] for s in p), 1)
                             for name, p in zip(names, per_edge)}}

    def banner(self, names: list[str]) -> str:
        cfg = self.cfg.data
        shards = "; ".join(f"{name} {s['train']} train / {s['test']} test"
                           + (f", labels {s['train_labels']}" if "train_labels" in s else "")
                           for name, s in zip(names, self.shards))
        if not all("train_labels" in s for s in self.shards):
            shards += " (label counts kept on the edges: data.share_label_counts)"
        how = cfg.partition + (f" alpha {cfg.dirichlet_alpha:g}" if cfg.partition == "dirichlet" else "")
        note = " (each edge computes its own statistics)" if computes_statistics(self.cfg) else ""
        return f"{_spec_text(self.cfg, self.spec)}{note} on the edges ({how} shards of each edge's {cfg.root}): {shards}"

    def files(self, names: list[str]) -> dict[str, Any]:
        return {"partition.json": {"partition": self.cfg.data.partition, "seed": self.cfg.train.seed,
                                   **dict(zip(names, self.shards))}}

    @staticmethod
    def load_on_edge(cfg: Config, edges: list[int]) -> tuple[Source, Source, Spec]:
        """The whole data set at this edge's data.root (a missing or broken folder fails here, before
        RPC); the shard is carved once the central's config has arrived."""
        return load(dataclasses.replace(cfg.data, limit_train=None, limit_test=None))

    @staticmethod
    def edge_data(cfg: Config, loaded: Optional[tuple[Source, Source, Spec]], edge: int) -> EdgeSide:
        """Edge number ``edge``'s shard: shards are carved over topology.edges (the most edges) by
        edge number, so an edge has the same shard whoever else is present."""
        if loaded is None:
            raise RuntimeError("this edge loaded no data: start it with data.placement=edge, as the central")
        train, test = (s if limit is None else s.subset(torch.arange(min(limit, len(s)))) for s, limit in
                       zip(loaded[:2], (cfg.data.limit_train, cfg.data.limit_test)))
        return Shard.carve(train, test, edge, cfg.topology.edges, cfg.data, cfg.train.seed, loaded[2].classes,
                           shares_label_counts(cfg), labels_leave(cfg))


class CallInputs:
    """An edge's data under central placement: the inputs arrive with each call."""
    calls = ()

    def inputs(self, source: Tensor) -> tuple[Tensor, None, None]:
        return source, None, None

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, saved: dict[str, Any]) -> None:
        if saved:
            raise RuntimeError("the checkpoint was written with the data on the edges (data.placement=edge): "
                               "resume with the same placement, or --resume never")

    def held(self) -> None:
        return None


def labels_leave(cfg: Config) -> bool:
    """Whether an edge's labels go to the central: only when the plan's last segment, with the loss,
    runs there (an edge asks its own config, which the central's agrees with: training.policy)."""
    return cfg.model.plan is None or cfg.model.plan[-1]["place"] == "central"


def shares_label_counts(cfg: Config) -> bool:
    """data.share_label_counts, null resolved: an edge tells the central its per-class counts only
    where the central learns the labels anyway (the loss on the central, and it holds the edge
    weights): a U-shaped plan or edge-held weights were chosen to keep label information home."""
    if cfg.data.share_label_counts is not None:
        return cfg.data.share_label_counts
    return labels_leave(cfg) and cfg.privacy.edge_weights == "central"
