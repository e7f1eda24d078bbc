"""The sections that say how the job runs: the optimisation and each side's compute (train), torch
RPC (rpc), the defences (privacy), and what is written where (output, checkpoint, logging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from split_trainer.config.errors import _require

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
    edges_per_sync: int = 3
    """With the data on the central: how many edges train between two replica syncs, round robin
    among them, the next ones in turn after each sync (FedAvg's clients per round). The average of
    many replicas that each trained one batch moves the edge segment by about one step's worth per
    sync: with 128 edges and every edge in every sync, 300 steps reached 94.4 % against 97.2 % with
    3 (docs/performance.md#many-edges). 0: every edge."""
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
        _require(self.edges_per_sync >= 0,
                 f"train.edges_per_sync must be 0 (every edge) or more, got {self.edges_per_sync}")
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
    hijack_check: float = 0.1
    """An edge's check of the gradients the central sends back, where the edge holds its data and
    the loss is the central's or a U-shaped plan's (relay engine, no activation noise): an honest central's gradients
    depend on each sample's label, so the edge averages the label gap (mean cosine similarity of
    its per-sample gradients within classes minus across) over about its last 10 batches, and stops
    in one line when it falls below this: the central is sending gradients of its own choosing
    (feature-space hijacking; docs/privacy.md#a-malicious-central). 0: off."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) reported for the activation noise."""
    raw_inputs: bool = False
    """Whether an edge holding its data (edge or vertical placement) may run a first segment with no
    learned layer before the cut (a Flatten, a pooling), which sends its inputs as they are: an edge
    refuses such a segment unless its own config sets this (training.policy)."""

    def __post_init__(self) -> None:
        _require(self.clip is None or self.clip > 0, f"privacy.clip must be null or positive, got {self.clip}")
        _require(self.noise >= 0, f"privacy.noise must be 0 or more, got {self.noise}")
        _require(self.noise == 0 or self.clip is not None,
                 "privacy.noise needs privacy.clip: the noise is scaled to the clipping norm (set both)")
        _require(self.nopeek >= 0, f"privacy.nopeek must be 0 or more, got {self.nopeek}")
        _require(self.label_noise >= 0, f"privacy.label_noise must be 0 or more, got {self.label_noise}")
        _require(0 <= self.hijack_check < 1, f"privacy.hijack_check must be in [0, 1), got {self.hijack_check}")
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
