"""Small tensor helpers shared by every side: state on the CPU, the average of replicas, and
reading a file of tensors that someone handed over."""

from __future__ import annotations

import io
import zipfile
from typing import Any, Optional

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


def non_finite(state: dict[str, Tensor]) -> Optional[str]:
    """The first entry of ``state`` that holds an inf or a NaN, or None: one such value in a
    replica reaches every edge through the average."""
    return next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def poisoned(states: dict[str, dict[str, Tensor]]) -> list[str]:
    """``name (entry)`` for every named state that holds an inf or a NaN (``non_finite``)."""
    return [f"{name} ({key})" for name, state in states.items() if (key := non_finite(state))]


def load_weights(data: bytes, source: str) -> Any:
    """The tensors and plain containers in ``data``, a file ``torch.save`` wrote; ValueError (one
    line naming ``source``) for anything else. ``torch.load(weights_only=True)`` runs no code, but
    it inflates a deflated entry of the archive: 16 kB can claim 16 MB of tensor. ``torch.save``
    stores every entry as it is, so an entry that is compressed, or sizes that add up to more than
    the file, is refused before anything is allocated."""
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"{source}: not a file torch.save wrote ({exc})") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED or e.compress_size != e.file_size]
    if packed or sum(e.file_size for e in entries) > len(data):
        raise ValueError(f"{source}: its archive claims more than its {len(data):,} bytes (a compressed entry: "
                         f"{', '.join(packed[:3]) or 'none'}): refused, nothing loaded")
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{source}: refused by torch.load(weights_only=True) "
                         f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})") from None
