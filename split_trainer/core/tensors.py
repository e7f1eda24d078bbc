"""Small tensor helpers shared by every side: state on the CPU, and the average of replicas."""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor


def on_cpu(obj: Any) -> Any:
    """``obj`` (a tensor, or dicts, lists and tuples of them) with every tensor on the CPU."""
    if isinstance(obj, Tensor):
        return obj.to("cpu")
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def average_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One stage from its replicas: floating-point parameters and buffers averaged, integer
    buffers (counters) taken from the first."""
    return {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}
