"""Typed, validated run configuration: YAML file plus dotted ``KEY=VALUE`` overrides.

Every check lives here so that a bad value fails on every rank before any process
group, RPC agent or data set is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A usage or configuration mistake: reported as one line, exit code 2."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class TopologyConfig:
    """Who takes part in the job."""
    edges: int = 3
    """Number of edges (edge1..edgeN); the job runs with 1 central + edges ranks. In an elastic
    fleet, the most edges (docs/elastic.md)."""
    min_edges: Optional[int] = None
    """The fewest edges the job trains with: an elastic fleet when below edges (edges come and go,
    launch/central.sh --hosts MIN:MAX); null: exactly edges."""
    transport: Literal["rpc", "loopback"] = "rpc"
    """rpc: torch RPC under torchrun, one process per rank (how a fleet runs); loopback: the central
    and every edge in one process, started without torchrun (python -m split_trainer ...): the same
    run, for a debugger, a notebook or a quick try (docs/how-it-works.md)."""

    def __post_init__(self) -> None:
        _require(self.edges >= 1, f"topology.edges must be at least 1, got {self.edges}")
        _require(self.min_edges is None or 1 <= self.min_edges <= self.edges,
                 f"topology.min_edges must be null or 1..topology.edges ({self.edges}), got {self.min_edges}")

    @property
    def fewest(self) -> int:
        return self.edges if self.min_edges is None else self.min_edges


@dataclass
class ModelConfig:
    """The network and where each of its layers runs (docs/plans.md)."""
    name: str = "mnist_cnn"
    """A registered architecture (mnist_cnn, tutorial_cnn, resnet_small), or an import path
    package.module:function to a function of yours that returns an nn.Sequential
    (docs/data-and-models.md)."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the model function (an import path's, or a registered model's:
    resnet_small takes blocks)."""
    split: Optional[str] = "pool"
    """The last layer that runs on the edges (mnist_cnn: conv1 relu1 conv2 relu2 pool dropout1 flatten
    fc1 relu3 dropout2): shorthand for the plan [{place: edge, until: split}, {place: central}]; null
    when plan is given."""
    plan: Optional[list] = None
    """Ordered segments [{place: edge|central, until: LAYER}, ...], places alternating, the first on
    the edge; the last one runs to the end. Overrides split."""
    dropout: bool = True
    """False replaces the dropout layers by identities (used by the equivalence test)."""
    bottleneck: Optional[int] = None
    """A learned bottleneck at every cut where an edge sends its activation to the central: a 1x1
    convolution down to this many channels at the end of the edge segment and one back up at the
    start of the central's (a linear layer each way after a linear layer). What crosses shrinks by
    the ratio. null: none."""
    merge: Literal["concat", "sum", "mean"] = "concat"
    """data.placement vertical: how the central joins the parties' activations of one batch (each
    flattened per sample): concat (widths add up), sum or mean (every party's width the same). The
    central's first linear layer takes the merged width (docs/vertical.md)."""

    def __post_init__(self) -> None:
        _require(self.bottleneck is None or (isinstance(self.bottleneck, int) and self.bottleneck >= 1),
                 f"model.bottleneck must be null or a whole number of channels (1 or more), got {self.bottleneck!r}")
        if self.plan is None:
            _require(self.split is not None, "model.split and model.plan are both null: set one of them")
            return
        self.split = None  # the plan says where every layer runs; a split beside it would say it twice
        _require(len(self.plan) >= 2, f"model.plan needs at least two segments (an edge one and a central one), "
                                      f"got {len(self.plan)}")
        for i, segment in enumerate(self.plan, 1):
            _require(isinstance(segment, dict) and set(segment) <= {"place", "until"} and "place" in segment,
                     f"model.plan segment {i} must be a mapping {{place: edge|central, until: LAYER}}, got {segment!r}")
            _require(segment["place"] in ("edge", "central"),
                     f"model.plan segment {i}: place must be edge or central, got {segment['place']!r}")
            until = segment.get("until")
            _require(i == len(self.plan) or until is not None,
                     f"model.plan segment {i} needs until: LAYER (only the last segment runs to the end by itself)")
            _require(until is None or isinstance(until, str),
                     f"model.plan segment {i}: until must be a layer name, got {until!r}")


DATA_SETS = ("mnist", "fashion_mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn", "image_folder", "csv")


@dataclass
class DataConfig:
    """The data set, where it lives, and how it is batched (docs/data-and-models.md,
    docs/data-and-placement.md)."""
    name: Literal[DATA_SETS] = "mnist"
    """Data set: one of torchvision's image-classification sets, image_folder, or csv (tabular
    files of a vertical fleet: placement vertical)."""
    root: str = "data/mnist"
    """Where the data set lies (its layout: docs/data-and-models.md). In edge placement each edge
    reads its own."""
    download: bool = True
    """Let torchvision download a missing data set into root (not image_folder)."""
    download_timeout_s: float = 60.0
    """A download that receives nothing for this long gives up (one line, exit 2)."""
    emnist_split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = "balanced"
    """EMNIST's split."""
    image_size: int = 32
    """image_folder: images are resized to image_size x image_size."""
    channels: Literal[1, 3] = 3
    """image_folder: 1 converts to grayscale, 3 to RGB."""
    mean: Optional[list] = None
    """image_folder: per-channel mean for normalisation; null computes it from the training images once."""
    std: Optional[list] = None
    """image_folder: per-channel standard deviation; null computes it with the mean."""
    num_classes: Optional[int] = None
    """image_folder: class count; null counts the class folders (the central of an edge-placement run
    holds none, so there it must be set). csv: the class count (labels 0..num_classes-1), required."""
    augment: Literal["none", "crop_flip"] = "none"
    """crop_flip: random crop (4 pixels of padding) and horizontal flip of training batches, on the
    side that holds the data, seeded by (seed, epoch, batch)."""
    batch_size: int = 64
    """Training samples per batch (one batch goes to one edge)."""
    eval_batch_size: int = 1000
    """Test samples per evaluation batch."""
    num_workers: int = 0
    """DataLoader worker processes on the side that holds the data; 0 gathers batches in the process
    itself."""
    limit_train: Optional[int] = None
    """Use only the first N training samples (quick runs and tests); null means all."""
    limit_test: Optional[int] = None
    """Use only the first N test samples; null means all."""
    placement: Literal["central", "edge", "vertical"] = "central"
    """central: the central loads the data and sends inputs to the edges; edge: every edge loads its
    own shard from data.root on its own host, and no input ever reaches the central; vertical: every
    edge is a party holding some features of the same records (by id) and the central holds the
    labels; records are aligned by private set intersection (docs/vertical.md)."""
    regions: Literal["bands", "quadrants"] = "bands"
    """Vertical placement of an image set: which part of every image each party holds. bands: edge k
    the k-th of topology.edges horizontal bands (2 edges: top and bottom halves); quadrants: edge1..4
    the top-left, top-right, bottom-left and bottom-right quarters (4 edges)."""
    missing: float = 0.0
    """Vertical placement of an image set: the share of records that each party's copy lacks, drawn
    per party from the seed (the records its files would not hold), so that alignment matters. csv
    files lack what they lack: this must stay 0."""
    partition: Literal["iid", "dirichlet", "local"] = "iid"
    """Edge placement: iid or dirichlet shards carved (seeded, disjoint) out of the data set at each
    edge's data.root; local: each edge uses all the data it finds (every host its own files)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the per-class Dirichlet draw (smaller: more skewed shards)."""
    test_on_every_edge: bool = False
    """Edge placement: every edge evaluates the whole test split instead of its own shard of it."""
    share_label_counts: Optional[bool] = None
    """Edge placement: each edge tells the central its shard's per-class label counts (train and
    test), for the banner and partition.json. null: only where the central learns the labels anyway
    (the loss on the central and privacy.edge_weights: central); true: always; false: never (the
    central learns the shard's sizes only; docs/privacy.md)."""

    def __post_init__(self) -> None:
        _require(self.dirichlet_alpha > 0, f"data.dirichlet_alpha must be positive, got {self.dirichlet_alpha}")
        _require(self.image_size >= 8, f"data.image_size must be at least 8, got {self.image_size}")
        _require(self.download_timeout_s > 0, f"data.download_timeout_s must be positive, got {self.download_timeout_s}")
        _require(self.num_classes is None or self.num_classes >= 2,
                 f"data.num_classes must be null or at least 2, got {self.num_classes}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            _require(value is None or (len(value) == self.channels and all(isinstance(v, (int, float)) for v in value)),
                     f"data.{key} must be null or a list of {self.channels} numbers (one per channel), got {value!r}")
        _require(self.std is None or all(v > 0 for v in self.std), f"data.std must be positive, got {self.std}")
        _require(self.batch_size >= 1, f"data.batch_size must be at least 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, f"data.eval_batch_size must be at least 1, got {self.eval_batch_size}")
        _require(self.num_workers >= 0, f"data.num_workers must be 0 or more, got {self.num_workers}")
        _require(0 <= self.missing < 1, f"data.missing must be in [0, 1), got {self.missing}")
        _require(self.name != "csv" or self.placement == "vertical",
                 "data.name=csv needs data.placement=vertical: csv reads one feature file per party "
                 "(docs/vertical.md)")
        _require(self.name != "csv" or self.num_classes is not None,
                 "data.name=csv needs data.num_classes: the parties build their segments without the labels")
        _require(self.name != "csv" or self.missing == 0,
                 "data.missing applies to image sets only: csv files lack the records they lack; set data.missing=0")
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key} must be null or at least 1, got {value}")


MOST_IN_FLIGHT = {"central": 3, "local": 8}
"""The most batches in flight per edge, by train.edge_loss: under the central's loss each one past
the first is a step staler; under a local loss only memory and the central's pace bound it."""


@dataclass
class TrainConfig:
    """The optimisation, and where and how each side computes."""
    epochs: int = 6
    """Passes over the training set."""
    max_steps: Optional[int] = None
    """Stop after this many steps (batches) in total, even mid-epoch; null means no cap."""
    optimizer: Literal["sgd", "adadelta", "adam"] = "sgd"
    """torch.optim optimizer used on both sides (one instance per segment)."""
    lr: float = 0.05
    """Learning rate of the first epoch."""
    lr_gamma: float = 0.7
    """Learning rate multiplier applied at each epoch end (StepLR, step size 1 epoch)."""
    momentum: float = 0.9
    """SGD momentum (ignored by other optimizers)."""
    weight_decay: float = 0.0
    """L2 penalty, for every optimizer."""
    loss: Literal["cross_entropy", "nll"] = "cross_entropy"
    """cross_entropy: on logits (the shipped networks); nll: on log-probabilities, for a network of
    your own that ends in log_softmax."""
    seed: int = 1
    """Seeds weights, data order and dropout: the same seed and config give the same run."""
    edge_sync_every: int = 20
    """Average the edges' segment replicas every this many steps (and at every epoch end)."""
    threads: int = 0
    """Intra-op threads per rank; 0 splits this host's cores by role (docs/performance.md)."""
    central_device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the central's segments compute; auto: CUDA when this host has it."""
    edge_device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where each edge's segments compute (on the edge's host); auto: CUDA when that host has it."""
    engine: Literal["autograd", "relay"] = "relay"
    """autograd: distributed autograd reaches the edge; relay: the central sends the activation
    gradient and the edge backprops and steps by itself while the head moves on (same gradients)."""
    in_flight: int = 1
    """Batches in flight per edge. 2 (relay only): the edge computes its next batch's first segment
    while the previous batch's gradient is on its way back, so a link carries both directions at
    once; that forward runs on weights one step stale (3: two steps), its gradient is taken at the
    weights it ran on (weight stashing) and applied to the current ones (docs/thin-links.md). With
    edge_loss local nothing is stale: up to 8, how far an edge may run ahead of the central."""
    edge_loss: Literal["central", "local"] = "central"
    """central: the edges' segments learn from the central's loss (its gradient comes back across
    the cut); local: each edge's segment learns from a small auxiliary head of its own on the
    labels, and only activations cross, one way (single-cut plans, relay engine; docs/thin-links.md)."""
    local_clip: Optional[float] = 1.0
    """With edge_loss local: the largest L2 norm of the gradient of each local step (the segment's
    and its head's together), scaled down to it when larger; null: no clipping. A local loss on a
    linear head diverged without it at lr 0.05 behind a model.bottleneck."""
    dispatch: Literal["round_robin", "free_first"] = "round_robin"
    """round_robin: batch i to edge i mod N, turns in that order (a function of seed and config);
    free_first: the next batch to whichever edge is free first and the central's turn to whichever
    activation arrives first, so a slow edge does not set everyone's pace (not bit-reproducible;
    docs/elastic.md)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"train.epochs must be at least 1, got {self.epochs}")
        _require(self.max_steps is None or self.max_steps >= 1,
                 f"train.max_steps must be null or at least 1, got {self.max_steps}")
        _require(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _require(0 < self.lr_gamma <= 1, f"train.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        _require(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be 0 or more, got {self.weight_decay}")
        _require(self.seed >= 0, f"train.seed must be 0 or more, got {self.seed}")
        _require(self.edge_sync_every >= 1, f"train.edge_sync_every must be at least 1, got {self.edge_sync_every}")
        _require(self.threads >= 0, f"train.threads must be 0 (auto) or more, got {self.threads}")
        most = MOST_IN_FLIGHT[self.edge_loss]
        _require(isinstance(self.in_flight, int) and 1 <= self.in_flight <= most,
                 f"train.in_flight must be a whole number from 1 to {most} with train.edge_loss={self.edge_loss}, "
                 f"got {self.in_flight!r}" + (" (each batch past the first runs on staler weights; train.edge_loss="
                                              "local has none and takes up to 8)" if most == 3 else ""))
        _require(self.in_flight == 1 or self.engine == "relay",
                 f"train.in_flight={self.in_flight} needs train.engine=relay: a distributed-autograd context "
                 f"cannot take a second batch's forward through weights that another batch's step changes in place")
        _require(self.local_clip is None or self.local_clip > 0,
                 f"train.local_clip must be null or positive, got {self.local_clip}")
        _require(self.edge_loss == "central" or self.engine == "relay",
                 "train.edge_loss=local needs train.engine=relay: no gradient crosses the cut, so there is none for "
                 "distributed autograd to carry")


WIRE_TYPES = ("float32", "float16", "bfloat16", "float8", "int8")
CHANNELS = ("basic", "cma", "mpt_uv", "xth", "cuda_basic", "cuda_ipc", "cuda_gdr", "cuda_xth")


@dataclass
class RpcConfig:
    """torch RPC: time bounds, threads, and what travels how."""
    timeout_s: float = 120.0
    """Longest wait for any RPC, rendezvous or peer; a silent peer past it ends the job. It bounds
    one call, counted from when it is sent; with train.in_flight 2 or 3 a training call may also wait
    on the edge behind the ones sent before it."""
    startup_timeout_s: float = 120.0
    """Longest wait for each edge's first calls: connecting and building its segments."""
    num_worker_threads: int = 8
    """TensorPipe worker threads per rank."""
    activation_dtype: Literal[WIRE_TYPES] = "float32"
    """What the activations travel as across every cut, turned back into float32 on arrival
    (computation stays in float32). float8 (e4m3) and int8: 8 bits a value and one float32 scale per
    sample; int8 needs the relay engine (docs/thin-links.md)."""
    gradient_dtype: Optional[Literal[WIRE_TYPES]] = None
    """What the activation gradients travel as, back across every cut; null: as activation_dtype."""
    channels: Optional[list] = None
    """TensorPipe's channels for tensor payloads, e.g. [basic]; null: TensorPipe's choice. Between
    processes of one machine it moves payloads by cross-memory attach (cma), outside any network:
    restrict to [basic] to emulate hosts on one machine; between real hosts leave it null
    (docs/thin-links.md)."""
    transport: Literal["tcp", "auto"] = "tcp"
    """tcp: TensorPipe's TCP transport between all ranks; auto: TensorPipe's choice (shared memory
    between ranks of one host, which busy-polls; TCP or InfiniBand across hosts)."""

    @property
    def wire_types(self) -> dict[str, str]:
        """What each kind of tensor on a cut travels as."""
        return {"activations": self.activation_dtype, "activation_grads": self.gradient_dtype or self.activation_dtype}

    def __post_init__(self) -> None:
        _require(self.channels is None or (len(self.channels) > 0 and all(c in CHANNELS for c in self.channels)),
                 f"rpc.channels must be null or a list of TensorPipe channels ({', '.join(CHANNELS)}), "
                 f"got {self.channels!r}")
        _require(self.timeout_s > 0, f"rpc.timeout_s must be positive, got {self.timeout_s}")
        _require(self.startup_timeout_s > 0, f"rpc.startup_timeout_s must be positive, got {self.startup_timeout_s}")
        _require(self.num_worker_threads >= 2,
                 f"rpc.num_worker_threads must be at least 2, got {self.num_worker_threads}")


@dataclass
class PrivacyConfig:
    """What the central can learn of the edges' data: who holds the edge weights, and the defences
    applied on the edges before anything crosses to the central (docs/privacy.md)."""
    edge_weights: Literal["central", "edges"] = "central"
    """central: the central averages the edge replicas and checkpoints them, so it holds their exact
    weights; edges: the edges average among themselves and each writes its own checkpoint part to
    its own disk, and no edge parameter or optimizer state ever reaches the central."""
    clip: Optional[float] = None
    """Activation defence: each sample's cut activation is clipped to this L2 norm before it leaves
    the edge (every cut whose activation goes to the central); null: no clipping."""
    noise: float = 0.0
    """Activation defence: Gaussian noise of standard deviation noise x clip is added to each
    clipped activation; (epsilon, delta) over the run is reported (needs clip)."""
    nopeek: float = 0.0
    """NoPeek: weight of the distance correlation between an edge's input batch and its first cut
    activation, added to the edge's loss."""
    label_noise: float = 0.0
    """Label protection (U-shaped plans): Gaussian noise on the gradients the edge sends back, of
    standard deviation label_noise x the batch's largest per-sample gradient norm / sqrt(values per
    sample)."""
    adversary: float = 0.0
    """Attacker-aware training: each edge trains its own decoder from its first cut activation back
    to its inputs, and adds adversary x (that decoder's SSIM - adversary_ssim, when above 0) to its
    loss, so that its segment learns activations its decoder cannot invert. The decoder never leaves
    the edge (needs edge_weights: edges). 0: off."""
    adversary_ssim: float = 0.3
    """The SSIM of the edge's own decoder below which the adversary term stops pushing (and
    training stays stable): about the SSIM that the class-mean image reaches on MNIST."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) reported for the activation noise."""

    def __post_init__(self) -> None:
        _require(self.clip is None or self.clip > 0, f"privacy.clip must be null or positive, got {self.clip}")
        _require(self.noise >= 0, f"privacy.noise must be 0 or more, got {self.noise}")
        _require(self.noise == 0 or self.clip is not None,
                 "privacy.noise needs privacy.clip: the noise is scaled to the clipping norm (set both)")
        _require(self.nopeek >= 0, f"privacy.nopeek must be 0 or more, got {self.nopeek}")
        _require(self.label_noise >= 0, f"privacy.label_noise must be 0 or more, got {self.label_noise}")
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _require(self.adversary >= 0, f"privacy.adversary must be 0 or more, got {self.adversary}")
        _require(-1 < self.adversary_ssim < 1, f"privacy.adversary_ssim must be in (-1, 1), got {self.adversary_ssim}")
        _require(self.adversary == 0 or self.edge_weights == "edges",
                 "privacy.adversary needs privacy.edge_weights: edges: with central-held weights the central writes "
                 "the edges' checkpoint parts, and the adversary's decoder would reach it (set both)")


@dataclass
class OutputConfig:
    """Where a run's files go (docs/outputs.md)."""
    run_dir: str = "runs/mnist"
    """Folder for config.yaml, metrics.jsonl, summary.json and model.pt."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept (docs/checkpoints-and-faults.md)."""
    dir: Optional[str] = None
    """Checkpoint folder; null means <run_dir>/checkpoints."""
    every_steps: int = 200
    """Save every this many steps, and at every epoch end."""
    keep: int = 3
    """Newest complete checkpoints kept; older ones are removed."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, f"checkpoint.every_steps must be at least 1, got {self.every_steps}")
        _require(self.keep >= 1, f"checkpoint.keep must be at least 1, got {self.keep}")


@dataclass
class LoggingConfig:
    """What is recorded while training (docs/outputs.md)."""
    every_steps: int = 50
    """Write a metrics line (and a plain console line without a terminal) every this many steps."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars under <run_dir>/tb (needs the tensorboard extra)."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, f"logging.every_steps must be at least 1, got {self.every_steps}")


@dataclass
class Config:
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def world_size(self) -> int:
        return 1 + self.topology.edges

    def __post_init__(self) -> None:
        _require(not (self.topology.transport == "loopback" and self.train.engine == "autograd"
                      and self.privacy.label_noise > 0),
                 "privacy.label_noise with train.engine=autograd needs topology.transport=rpc: on loopback the "
                 "noise would be drawn in the central's backward from the central's random stream, not the edge's; "
                 "use train.engine=relay")
        places = [segment.get("place") for segment in self.model.plan] if self.model.plan else ["edge", "central"]
        _require(self.train.edge_loss == "central" or places == ["edge", "central"],
                 f"train.edge_loss=local needs a single-cut plan (edge, then central), got "
                 f"{' -> '.join(map(str, places))}: set model.split instead of model.plan, or train.edge_loss=central")
        if self.data.placement == "vertical":
            self._check_vertical(places)
        if self.train.engine == "autograd":  # the gradient of what crossed comes back in the type it went out in
            _require(self.rpc.gradient_dtype in (None, self.rpc.activation_dtype),
                     f"rpc.gradient_dtype={self.rpc.gradient_dtype} needs train.engine=relay: distributed autograd "
                     f"sends the activations' gradients back in the type the activations went out in "
                     f"({self.rpc.activation_dtype}); set rpc.gradient_dtype=null")
            _require(self.rpc.activation_dtype != "int8",
                     "rpc.activation_dtype=int8 needs train.engine=relay: distributed autograd sends a gradient "
                     "only for a floating-point tensor; use float8 (8 bits as well) or train.engine=relay")

    def _check_vertical(self, places: list) -> None:
        """What a vertical fleet cannot do: every party holds a part of every batch."""
        _require(self.topology.min_edges in (None, self.topology.edges),
                 "data.placement=vertical needs every party: a missing one's features are missing from every batch; "
                 "set topology.min_edges=null (launch/central.sh --hosts N, not MIN:MAX)")
        _require(places == ["edge", "central"] and self.model.plan is None,
                 "data.placement=vertical needs a single cut (model.split): each party runs its own first segment "
                 "and the central the rest; set model.plan=null")
        _require(self.data.regions != "quadrants" or self.topology.edges == 4,
                 f"data.regions=quadrants needs topology.edges=4 (one party per quarter), got {self.topology.edges}")
        for ok, what in ((self.train.edge_loss == "central", "train.edge_loss=local"),
                         (self.train.in_flight == 1, f"train.in_flight={self.train.in_flight}"),
                         (self.train.dispatch == "round_robin", "train.dispatch=free_first"),
                         (self.data.augment == "none", f"data.augment={self.data.augment}"),
                         (self.privacy.adversary == 0, "privacy.adversary"),
                         (self.privacy.label_noise == 0, "privacy.label_noise"),
                         (self.model.bottleneck is None, "model.bottleneck")):
            _require(ok, f"{what} is not supported with data.placement=vertical (every party takes every batch; "
                         f"docs/vertical.md): leave it at its default")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML alone reads ``1e-3`` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return value (ints widened to float where a float is wanted) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        _require(value in choices, f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _check_type(value, args[0], key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    _require(ok, f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    _require(isinstance(raw, dict), f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        _require(key in names, f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as a YAML scalar)."""
    key, sep, value = text.partition("=")
    _require(bool(sep) and bool(key.strip()), f"override {text!r} must look like KEY=VALUE, e.g. train.lr=0.1")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    _require(not isinstance(parsed, dict), f"override {text!r}: the value must be a scalar or a list")
    return key.strip().split("."), parsed


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Read the YAML file (or defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _require(path.is_file(), f"config file {path} not found: pass --config with a YAML file, e.g. configs/mnist.yaml")
        try:
            raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Validate a plain mapping (a YAML file's, or one saved in a checkpoint) plus overrides."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return _build(Config, raw, "")
