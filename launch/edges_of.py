"""topology.edges of a config file plus its --set overrides, for the launch scripts (with --min:
topology.min_edges, empty when null); a bad config is one line and exit 2, like split_trainer's
own check."""
import sys

from split_trainer.config import ConfigError, load_config

wants_min = sys.argv[1] == "--min"
argv = sys.argv[2:] if wants_min else sys.argv[1:]
overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
try:
    topology = load_config(argv[0], overrides).topology
except ConfigError as exc:
    print(f"split_trainer: error: {exc}", file=sys.stderr)
    sys.exit(2)
print(("" if topology.min_edges is None else topology.min_edges) if wants_min else topology.edges)
