"""Defences at the cut, applied on the edge before anything leaves it for the central, and the
privacy accounting of the one that is a Gaussian mechanism (docs/privacy.md).

- Activation noise: each sample's cut activation clipped to an L2 norm (``privacy.clip``), plus
  Gaussian noise of standard deviation ``privacy.noise`` x clip.
- NoPeek: the distance correlation between an edge's input batch and its first cut activation,
  weighted by ``privacy.nopeek``, added to the edge's loss (its gradient joins the one that comes
  back from the central, so it works the same under both engines).
- Label protection (U-shaped plans, where the labels stay on the edge): Gaussian noise on the
  gradients the edge sends back, scaled to the batch's largest per-sample gradient norm
  (``privacy.label_noise``), as in the max-norm defence.

Every defence is part of the edge's graph: clipping is differentiated through, and the noise draws
from the edge's own RNG stream, which checkpoints keep (a resumed run draws the same noise).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from split_trainer.config import PrivacyConfig
from split_trainer.training.route import Hop, crossing

Tensor = torch.Tensor


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Székely's distance correlation between two batches (samples first), in [0, 1]."""
    def centred(t: Tensor) -> Tensor:
        # Exact distances: the matrix-product shortcut leaves the diagonal a little above zero, where
        # the square root's gradient is huge.
        d = torch.cdist(t.flatten(1), t.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(z)
    dcov2, xvar, zvar = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov2.clamp_min(0) / (xvar * zvar).sqrt().clamp_min(1e-12)).sqrt()


class _AddToGradient(torch.autograd.Function):
    """Identity forward; backward adds ``extra`` (the gradient of a term of the edge's own loss)."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, extra: Tensor) -> Tensor:
        ctx.save_for_backward(extra)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (extra,) = ctx.saved_tensors
        return grad + extra, None


class _NoisyGradient(torch.autograd.Function):
    """Identity forward; backward adds Gaussian noise of ``scale`` x the batch's largest
    per-sample gradient norm / sqrt(values per sample), so every sample's gradient is drowned to a
    similar norm whatever its label."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        largest = grad.flatten(1).norm(dim=1).max()
        return grad + torch.randn_like(grad) * (ctx.scale * largest / grad[0].numel() ** 0.5), None


def clip_and_noise(out: Tensor, clip: Optional[float], noise: float) -> Tensor:
    """Each sample clipped to L2 norm ``clip``, plus N(0, (noise x clip)^2) per value."""
    if clip is None:
        return out
    norms = out.flatten(1).norm(dim=1).clamp_min(1e-12)
    out = out * (clip / norms).clamp(max=1.0).view(-1, *([1] * (out.dim() - 1)))
    return out + torch.randn_like(out) * (noise * clip) if noise > 0 else out


class Defences:
    """The edge's defences for a plan (``places``); a no-op where none is configured."""

    def __init__(self, cfg: PrivacyConfig, places: list[str]):
        self.cfg = cfg
        self.labels_on_edge = places[-1] == "edge"

    def incoming(self, hop: Hop, x: Tensor) -> Tensor:
        """An input from the central whose gradient goes back to it: with the labels on this edge,
        that gradient carries them, so it gets the label noise."""
        into = crossing(hop, "in")
        if (self.cfg.label_noise > 0 and self.labels_on_edge and hop.place == "edge" and into.cut is not None
                and not hop.evaluating):
            return _NoisyGradient.apply(x, self.cfg.label_noise)
        return x

    def outgoing(self, hop: Hop, inputs: Tensor, out: Tensor) -> Tensor:
        """A segment's output: if it leaves for the central as an activation, NoPeek's gradient
        joins it (first segment, training) and it is clipped and noised."""
        leaves = crossing(hop, "out")
        if hop.place != "edge" or leaves is None or leaves.kind != "activations":
            return out
        if self.cfg.nopeek > 0 and hop.segment == 0 and not hop.evaluating:
            with torch.enable_grad():
                z = out.detach().requires_grad_()
                extra, = torch.autograd.grad(self.cfg.nopeek * distance_correlation(inputs.detach(), z), z)
            out = _AddToGradient.apply(out, extra)
        return clip_and_noise(out, self.cfg.clip, self.cfg.noise)


def describe(cfg: PrivacyConfig, epochs: int) -> str:
    """The banner's privacy line."""
    weights = "the edges keep their weights" if cfg.edge_weights == "edges" else "the central holds the edge weights"
    defences = [f"activations clipped to {cfg.clip:g}" if cfg.clip else "",
                f"noise {cfg.noise:g} x clip (epsilon {epsilon(cfg, epochs):.3g} at delta {cfg.delta:g} over "
                f"{epochs} epochs)" if cfg.noise else "",
                f"NoPeek {cfg.nopeek:g}" if cfg.nopeek else "", f"label noise {cfg.label_noise:g}" if cfg.label_noise else ""]
    return "; ".join([weights, *filter(None, defences)] if any(defences) else [weights, "no defence at the cut"])


def epsilon(cfg: PrivacyConfig, releases: int) -> Optional[float]:
    """ε of the activation noise over ``releases`` releases of each sample's activation (one per
    epoch), at δ = ``cfg.delta``, from Opacus's RDP accountant; None without noise.

    Each release is a Gaussian mechanism on one sample's clipped activation: two inputs' clipped
    activations differ by at most 2 x clip in L2, and the noise's standard deviation is noise x
    clip, so its noise multiplier (standard deviation over sensitivity) is noise / 2."""
    if cfg.clip is None or cfg.noise <= 0 or releases <= 0:
        return None
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=cfg.noise / 2, steps=releases, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=cfg.delta)
    return float(eps)
