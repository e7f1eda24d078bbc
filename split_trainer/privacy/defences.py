"""Defences at the cut, applied on the edge before anything leaves it for the central, and the
privacy accounting of the one that is a Gaussian mechanism (docs/privacy.md).

- Activation noise: each sample's cut activation clipped to an L2 norm (``privacy.clip``), plus
  Gaussian noise of standard deviation ``privacy.noise`` x clip.
- NoPeek: the distance correlation between an edge's input batch and its first cut activation,
  weighted by ``privacy.nopeek``, added to the edge's loss (its gradient joins the one that comes
  back from the central, so it works the same under both engines).
- Attacker-aware training: the gradient of the edge's own decoder's reconstruction quality joins
  the one that comes back, as NoPeek's does (split_trainer.privacy.adversary).
- Label protection (U-shaped plans, where the labels stay on the edge): Gaussian noise on the
  gradients the edge sends back, scaled to the batch's largest per-sample gradient norm
  (``privacy.label_noise``), as in the max-norm defence.

Every defence is part of the edge's graph: clipping is differentiated through, and the noise draws
from the edge's own RNG stream, which checkpoints keep (a resumed run draws the same noise).

The activation noise's epsilon is reported for the releases counted as they happen (``Releases``),
not for the epochs: under free_first, with edges away, or after a failure, a sample can be released
more often than once an epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from split_trainer.config import PrivacyConfig
from split_trainer.core.files import write_json
from split_trainer.core.hops import Hop, crossing
from split_trainer.privacy.adversary import Adversary

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
    """The edge's defences for a plan (``places``); a no-op where none is configured. ``adversary``:
    the edge's own decoder, on the edge only (the audit plays the central without it)."""

    def __init__(self, cfg: PrivacyConfig, places: list[str], adversary: Optional[Adversary] = None):
        self.cfg, self.adversary = cfg, adversary
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
        joins it (first segment, training), it is clipped and noised, and the adversary's gradient
        joins what leaves: the edge's decoder learns from what the central would receive."""
        leaves = crossing(hop, "out")
        if hop.place != "edge" or leaves is None or leaves.kind != "activations":
            return out
        first = hop.segment == 0 and not hop.evaluating
        if first and self.cfg.nopeek > 0:
            with torch.enable_grad():
                z = out.detach().requires_grad_()
                extra, = torch.autograd.grad(self.cfg.nopeek * distance_correlation(inputs.detach(), z), z)
            out = _AddToGradient.apply(out, extra)
        out = clip_and_noise(out, self.cfg.clip, self.cfg.noise)
        if first and self.adversary is not None:
            out = _AddToGradient.apply(out, self.adversary.gradient(inputs, out))
        return out


def banner(cfg: PrivacyConfig, epochs: int) -> str:
    """The banner's privacy line: the epsilon it gives is the plan's (one release an epoch), not a count."""
    weights = "the edges keep their weights" if cfg.edge_weights == "edges" else "the central holds the edge weights"
    defences = [f"activations clipped to {cfg.clip:g}" if cfg.clip else "",
                f"noise {cfg.noise:g} x clip (planned: epsilon {epsilon(cfg, epochs):.3g} at delta {cfg.delta:g} if "
                f"each training sample is released once an epoch for {epochs} epochs; the summary's epsilon counts "
                f"the releases)" if cfg.noise else "",
                f"NoPeek {cfg.nopeek:g}" if cfg.nopeek else "",
                f"adversary {cfg.adversary:g} (each edge's own decoder, pushed down to SSIM {cfg.adversary_ssim:g})"
                if cfg.adversary else "", f"label noise {cfg.label_noise:g}" if cfg.label_noise else ""]
    return "; ".join([weights, *filter(None, defences)] if any(defences) else [weights, "no defence at the cut"])


def epsilon(cfg: PrivacyConfig, releases: int) -> Optional[float]:
    """ε of the activation noise for a sample whose activation was released ``releases`` times, at
    δ = ``cfg.delta``, from Opacus's RDP accountant; None without noise (or without a release).

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


LEDGER = "releases.json"


class Releases:
    """How often each training sample's activation has gone to the central: per set of samples
    (each edge's shard; central placement: the data set), the most times any one of its samples
    has been released. The placement counts a release where a pass over a set starts (``counts``
    is the progress record's, so checkpoints keep it, an edge away included).

    A checkpoint keeps the count as of its step, but an attempt that fails after it has already sent
    the central batches past that step, which the next attempt sends again. So before each span the
    central writes a ledger (``<run_dir>/releases.json``): the step the span ends at and, per set,
    the most batches it may have served by then and the releases that makes. A run resumed behind
    the ledger starts each set from the releases the attempt before may have reached, plus one where
    it re-enters a pass partway: the redone batches then release their samples twice in that pass,
    which no pass boundary counts (one at a boundary is counted when it is redone)."""

    def __init__(self, counts: dict[str, int], path: Path):
        self.counts, self.path = counts, path

    def start(self, step: int, passes: dict[str, tuple[int, int]], served: dict[str, int], resumed: bool) -> None:
        """Before training: ``passes`` per present set (batches served, batches a pass); ``served``
        every edge's batches served (the progress record's)."""
        for name, (count, batches) in passes.items():
            self.counts.setdefault(name, -(-count // batches))  # a checkpoint from before the count was kept
        ledger = self._ledger() if resumed else None
        if ledger is None or ledger["step"] <= step:
            return  # a new run, or nothing was sent past this checkpoint
        at = {**served, **{name: count for name, (count, _) in passes.items()}}
        for name, entry in ledger["sets"].items():
            here = at.get(name, 0)
            partway = entry["reached"] > here and here % entry["batches"] != 0
            self.counts[name] = max(self.counts.get(name, 0), entry["releases"] + partway)

    def before_span(self, end: int, passes: dict[str, tuple[int, int]], reach: dict[str, int]) -> None:
        """Write the ledger for a span ending at step ``end``: ``reach`` per set, the most batches
        of it that set can serve."""
        sets = {}
        for name, (count, batches) in passes.items():
            reached = count + reach.get(name, 0)
            sets[name] = {"reached": reached, "batches": batches,
                          "releases": self.counts.get(name, 0) + -(-reached // batches) - -(-count // batches)}
        write_json(self.path, {"step": end, "sets": sets})

    def _ledger(self) -> Optional[dict[str, Any]]:
        try:
            ledger = json.loads(self.path.read_text())
            return ledger if isinstance(ledger.get("step"), int) and isinstance(ledger.get("sets"), dict) else None
        except (OSError, ValueError, AttributeError):
            return None  # no ledger (a run from before it was kept): the checkpoint's count stands

    def report(self, cfg: PrivacyConfig, per_edge: bool) -> dict[str, Any]:
        """The run's releases and epsilon (its most-released sample's), and with edge-held data each edge's."""
        most = max(self.counts.values(), default=0)
        report: dict[str, Any] = {"releases": most, "epsilon": epsilon(cfg, most)}
        if per_edge:
            report["per_edge"] = {name: {"releases": count, "epsilon": epsilon(cfg, count)}
                                  for name, count in sorted(self.counts.items(), key=lambda kv: (len(kv[0]), kv[0]))}
        return report
