"""Typed, validated run configuration: YAML file plus dotted ``KEY=VALUE`` overrides.

Every check lives here so that a bad value fails on every rank before any process group, RPC
agent or data set is touched: each section's own in its ``__post_init__`` (job.py: topology,
model, data; run.py: train, rpc, privacy, output, checkpoint, logging), the checks across
sections in whole.py, types and overrides in loading.py. Import everything from here.

May import: core.
"""

from split_trainer.config.errors import ConfigError
from split_trainer.config.job import DATA_SETS, DataConfig, ModelConfig, TopologyConfig
from split_trainer.config.loading import config_from_dict, load_config, parse_override
from split_trainer.config.run import (CHANNELS, MOST_IN_FLIGHT, WIRE_TYPES, CheckpointConfig, LoggingConfig,
                                      OutputConfig, PrivacyConfig, RpcConfig, TrainConfig)
from split_trainer.config.whole import Config

__all__ = ["CHANNELS", "DATA_SETS", "MOST_IN_FLIGHT", "WIRE_TYPES", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "LoggingConfig", "ModelConfig", "OutputConfig", "PrivacyConfig", "RpcConfig",
           "TopologyConfig", "TrainConfig", "config_from_dict", "load_config", "parse_override"]
