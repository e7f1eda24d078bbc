"""The whole config: its sections, the checks across them, and its YAML form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from split_trainer.config.errors import _require
from split_trainer.config.job import DataConfig, ModelConfig, TopologyConfig
from split_trainer.config.run import (CheckpointConfig, LoggingConfig, OutputConfig, PrivacyConfig, RpcConfig,
                                      TrainConfig)


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
        if self.topology.transport == "grpc":
            self._check_grpc()
        if self.topology.membership == "live":
            self._check_live()
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

    def _check_grpc(self) -> None:
        """What the grpc transport does not carry."""
        _require(self.train.engine == "relay",
                 "train.engine=autograd needs topology.transport=rpc or loopback: distributed autograd does not "
                 "cross the grpc transport; use train.engine=relay")

    def _check_live(self) -> None:
        """What a live fleet (training.live) needs: edges that can come and go (grpc's dial in;
        loopback's, at SPLIT_TRAINER_FAULT's leave and join), the engine whose every call stands
        alone (relay), and a turn that calls no edge."""
        for ok, what in ((self.topology.transport in ("grpc", "loopback"),
                          f"topology.transport={self.topology.transport} (use grpc, or loopback to try it)"),
                         (self.train.engine == "relay", "train.engine=autograd (use relay, the grpc transport's)"),
                         (self.train.edge_loss == "central", "train.edge_loss=local (use central)"),
                         (self.model.plan is None, "model.plan (use model.split: a single cut)")):
            _require(ok, f"topology.membership=live does not take {what}: docs/elastic.md#a-live-fleet")

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
