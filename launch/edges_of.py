"""topology.edges of a config file plus its --set overrides, for the launch scripts; a bad config
is one line and exit 2, like split_trainer's own check."""
import sys

from split_trainer.config import ConfigError, load_config

args = sys.argv[2:]
overrides = [a for a in args if "=" in a and not a.startswith("-")]
try:
    print(load_config(sys.argv[1], overrides).topology.edges)
except ConfigError as exc:
    print(f"split_trainer: error: {exc}", file=sys.stderr)
    sys.exit(2)
