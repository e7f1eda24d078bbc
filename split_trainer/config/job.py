"""The sections that say what the job is: who takes part (topology), the network and where each of its
layers runs (model), and the data (data). One dataclass per section, a docstring under each
field (the configuration reference is generated from them), its own checks in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from split_trainer.config.errors import _require


@dataclass
class TopologyConfig:
    """Who takes part in the job."""
    edges: int = 3
    """Number of edges (edge1..edgeN); the job runs with 1 central + edges ranks. In an elastic
    fleet, the most edges (docs/elastic.md)."""
    min_edges: Optional[int] = None
    """The fewest edges the job trains with: an elastic fleet when below edges (edges come and go,
    launch/central.sh --hosts MIN:MAX); null: exactly edges."""
    transport: Literal["rpc", "loopback", "grpc"] = "rpc"
    """rpc: torch RPC under torchrun, one process per rank (how a fleet runs); loopback: the central
    and every edge in one process, started without torchrun (python -m split_trainer ...): the same
    run, for a debugger, a notebook or a quick try (docs/how-it-works.md); grpc: each edge dials the
    central over mutual TLS and keeps one stream, nothing listens on an edge, no pickle on the wire
    (across machines: python -m split_trainer serve / edge; under torchrun on one machine:
    certificates made in the run folder), relay engine only (docs/hosts-and-security.md)."""
    membership: Literal["fixed", "live"] = "fixed"
    """fixed: a lost edge ends the attempt, and the job resumes from its newest checkpoint (torchrun's
    or serve's restarts; docs/elastic.md); live (grpc, or loopback to try it): an edge that leaves
    is let go and its batches trained by the others, an edge that dials in joins at the next flush,
    and nothing restarts; below min_edges the central waits rpc.startup_timeout_s. Central or
    edge placement (not vertical), the loss on the central, a single cut; free_first keeps a
    frozen edge from holding the others' turns, round_robin makes the same joins and leaves give
    the same run (docs/elastic.md#a-live-fleet)."""

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
    """A registered architecture (mnist_cnn, tutorial_cnn, resnet_small; mlp for tables), or an
    import path package.module:function to a function of yours that returns an nn.Sequential
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
    psi_max_ratio: float = 2.0
    """Vertical placement: a party answers the label party's alignment request only when it holds at
    most this many ids per id the party holds itself (each id asked is a guess that the answer
    confirms or denies), once per run (docs/vertical.md). An edge's own config decides it."""
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
        _require(self.psi_max_ratio > 0, f"data.psi_max_ratio must be positive, got {self.psi_max_ratio}")
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
