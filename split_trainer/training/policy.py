"""The edge's own policy: what may leave an edge is decided on the edge, by its own config.

The central's config decides the training (steps, learning rate, when to sync); it cannot decide
what the edge computes on its data and sends: its segment, its defences, whether its labels or
label counts leave, whether its weights reach the central. Every edge process has its own config
(its command line; on one machine the same file as the central's), and before it builds anything
from the central's config it compares the keys below: any difference is refused with one line that
names each key, the central's value and the edge's own, in the shape of a checkpoint's fingerprint
check. The central learns the edge's policy from that refusal, never the other way round.

Where the edge's own config applies without a comparison (where its data lies, where and how many
of its checkpoint parts it keeps), training.hosting gives it straight to the edge.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from split_trainer.config import Config
from split_trainer.core.errors import EdgeRefusal, say
from split_trainer.model.plan import Plan

OWN_KEYS = ("model.name", "model.args", "model.split", "model.plan", "model.bottleneck", "model.merge",
            "data.name", "data.placement", "data.regions", "data.share_label_counts", "data.psi_max_ratio",
            "train.edge_loss", "privacy.edge_weights", "privacy.clip", "privacy.noise", "privacy.nopeek",
            "privacy.label_noise", "privacy.adversary", "privacy.adversary_ssim", "privacy.raw_inputs",
            "privacy.hijack_check")
"""The keys an edge is the authority on: what its segment is (the model and its cuts), what it holds
(its data and who takes the labels), and the defences it applies before anything leaves it."""


def value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def differences(own: Config, theirs: Config) -> list[str]:
    """``key=theirs (this edge: own)`` for every key of OWN_KEYS on which the configs differ."""
    def text(v: Any) -> str:
        return json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else str(v)
    return [f"{key}={text(value(theirs, key))} (this edge: {text(value(own, key))})" for key in OWN_KEYS
            if json.loads(json.dumps(value(own, key))) != json.loads(json.dumps(value(theirs, key)))]


def check_config(name: str, own: Config, theirs: Config) -> None:
    """Refuse the central's config ``theirs`` where it differs from this edge's own on its keys."""
    found = differences(own, theirs)
    if found:
        raise EdgeRefusal(f"{name} refuses the central's config, which gives {'; '.join(found)}: start the "
                          f"central with the edges' settings, or change this edge's own config")


def check_segment(name: str, own: Config, plan: Plan) -> None:
    """A first segment with no learned layer sends the edge's inputs as they are (a Flatten, a
    pooling): refused where the edge holds the data, unless its own config accepts it."""
    first = plan.segments[0]
    if own.data.placement == "central" or own.privacy.raw_inputs or first.place != "edge":
        return
    if not any(isinstance(p, nn.Parameter) and p.requires_grad for p in first.module.parameters()):
        layers = ", ".join(first.layers)
        raise EdgeRefusal(f"{name} refuses to send its raw inputs: its first segment ({layers}) has no learned "
                          f"layer before the cut; cut after a learned layer (model.split), or set "
                          f"privacy.raw_inputs=true in this edge's own config")


@contextmanager
def said(name: str) -> Iterator[None]:
    """A refusal is printed as edge ``name``'s own line, wherever the edge runs (its own process on
    RPC and grpc), and goes on to the central, which repeats it."""
    try:
        yield
    except EdgeRefusal as exc:
        say(f"split_trainer: [{name}] error: {exc}")
        raise
