"""What crosses the wire between the central and an edge: the conversion of what crosses a cut
(8-bit packing included), the edge's typed reply, and the size of a payload. Counting it, per
edge, is the link's business (transport.link)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from split_trainer.core.hops import Crossing

Tensor = torch.Tensor


class Reply(NamedTuple):
    """What an edge's call (or a stage's hop) gives back; each field only where it applies."""
    output: Optional[Tensor] = None
    """The tensor handed on: an activation forward, an activation gradient backward."""
    loss: float | Tensor | None = None
    """Training's last segment: the batch's loss (relay: a number; autograd: the tensor to backprop)."""
    score: Optional[tuple[float, int, int]] = None
    """Evaluation's last segment: summed loss, correct predictions, samples."""
    labels: Optional[Tensor] = None
    """Edge placement: the labels of the batch the edge drew, when the loss is on the central."""


class Packed(NamedTuple):
    """An 8-bit tensor on the wire: its values, and one float32 scale per sample (value = code x
    scale). Under distributed autograd also a per-sample ``carrier``: zeros forward, whose gradient
    brings the returning gradient's scales back (distributed autograd sends a gradient only for a
    tensor that crossed, and only in that tensor's type)."""
    values: Tensor
    scale: Tensor
    carrier: Optional[Tensor] = None


FLOAT8 = torch.float8_e4m3fn
RANGE = {"int8": 127.0, "float8": 448.0}  # the largest code of each 8-bit type


def _scale(t: Tensor, kind: str) -> Tensor:
    """One scale per sample, mapping the sample's largest magnitude to the type's largest code."""
    return t.detach().abs().flatten(1).amax(1).clamp_min(1e-30) / RANGE[kind]


def _per_sample(scale: Tensor, like: Tensor) -> Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


def pack(t: Tensor, kind: str) -> Packed:
    """``t`` (a batch, sample first) in 8 bits: int8 rounded to nearest, or float8 e4m3."""
    t = t.detach().to("cpu", torch.float32)
    scale = _scale(t, kind)
    scaled = t / _per_sample(scale, t)
    values = scaled.round_().clamp_(-127, 127).to(torch.int8) if kind == "int8" else scaled.to(FLOAT8)
    return Packed(values, scale)


def unpack(p: Packed) -> Tensor:
    return p.values.float() * _per_sample(p.scale, p.values)


class _SendFloat8(torch.autograd.Function):
    """Forward: ``x`` as a float8 Packed with a carrier; backward: the float8 gradient that came
    back for the values, times the scales that came back on the carrier."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = pack(x, "float8")
        ctx.mark_non_differentiable(p.scale)
        ctx.device = x.device
        return p.values, p.scale, torch.zeros(len(x))

    @staticmethod
    def backward(ctx, values_grad: Tensor, _scale_grad: Optional[Tensor], carrier_grad: Tensor) -> Optional[Tensor]:
        if values_grad is None:
            return None
        return (values_grad.float() * _per_sample(carrier_grad, values_grad)).to(ctx.device)


class _ReceiveFloat8(torch.autograd.Function):
    """Forward: the float32 tensor a float8 Packed stands for; backward: its gradient in float8,
    one scale per sample on the carrier's gradient."""

    @staticmethod
    def forward(ctx, values: Tensor, scale: Tensor, carrier: Tensor) -> Tensor:
        return values.float() * _per_sample(scale, values)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor]:
        p = pack(grad, "float8")
        return p.values, None, p.scale


class WireFormat:
    """How a tensor travels: on the CPU (torch RPC's RRefs and distributed autograd take no CUDA
    tensors) and, across a cut, as its kind's wire type (rpc.activation_dtype, rpc.gradient_dtype),
    turned back into float32 on arrival. ``graph``: the autograd engine's tensors keep their graph
    across the wire, so the conversion is differentiable and the gradient travels back in the type
    the activation went out in."""

    def __init__(self, types: dict[str, str], graph: bool = False):
        self.types, self.graph = types, graph

    def encode(self, tensor: Tensor, crossing: Optional[Crossing]) -> Tensor | Packed:
        if crossing is not None and crossing.cut is None:
            return tensor  # a batch's inputs travel as loaded
        if crossing is None or not tensor.is_floating_point():
            return tensor.to("cpu")
        kind = self.types[crossing.kind]
        if kind in RANGE:
            return Packed(*_SendFloat8.apply(tensor)) if self.graph else pack(tensor, kind)
        return tensor.to("cpu", getattr(torch, kind))

    def decode(self, payload: Tensor | Packed, crossing: Optional[Crossing]) -> Tensor:
        if isinstance(payload, Packed):
            return _ReceiveFloat8.apply(*payload) if payload.carrier is not None else unpack(payload)
        if crossing is None or crossing.cut is None or not payload.is_floating_point():
            return payload
        return payload.float() if payload.dtype != torch.float32 else payload


def nbytes(obj: Any) -> int:
    """Tensor payload of a (nested) call argument or reply."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0
