"""Attacker-aware training (``privacy.adversary``): each edge trains its own inversion decoder, from
its first cut activation back to its inputs, and pushes its segment towards activations that decoder
cannot invert (after ResSFL, Li et al., CVPR 2022).

At every training forward of the first segment, on the edge:
1. the decoder takes one Adam step towards the inputs (MSE) from the activation, detached;
2. the gradient of ``adversary x (SSIM(decoder(activation), inputs) - adversary_ssim)`` with respect
   to the activation, when the SSIM is above the threshold, joins the gradient the central sends
   back (as NoPeek's does), so the segment's next step makes the decoder's job harder.
The activation is the one that leaves, activation noise included (privacy.clip, noise): the decoder
plays the central, and with noise the segment can learn to put what would identify an image below
the noise, which removes it rather than hiding it from one decoder.

Why SSIM, not the decoder's MSE: it is bounded (a term in [-1, 1] cannot run away as a negated
MSE can: subtracting the MSE with weight 1 took a run to 9.8 %), it does not reward merely moving
the images' brightness, and it is the figure the audit reports. Why the threshold: once the
decoder is no better than the class-mean image (SSIM about 0.3 on MNIST) there is nothing left
to hide that the label does not tell, and pushing further only costs accuracy; the term is zero
below it, so training does not fight a decoder that has already lost. The term is computed from the
activation of this very forward, with the weights the forward ran on (with batches in flight too).

The decoder and its optimizer are the edge's alone: they are in the edge's own checkpoint part
(privacy.edge_weights: edges, which this needs) and never cross the wire, not even to a peer edge.
They are built from ``train.seed`` in a forked RNG, so the edge's dropout and noise streams draw
what they would draw without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from split_trainer.config import PrivacyConfig
from split_trainer.core.tensors import on_cpu
from split_trainer.model.plan import output_shape
from split_trainer.privacy.attacks import ssim

Tensor = torch.Tensor


def edge_decoder(given: tuple[int, ...], image: tuple[int, ...]) -> nn.Module:
    """The edge's own decoder: small against its segment (about 6M multiply-adds per MNIST image from
    a 64x12x12 cut, the segment about 11M), and smaller than either of the audit's decoders."""
    if len(given) == 3 and given[1] * given[2] > 1:
        return nn.Sequential(nn.Conv2d(given[0], 32, 3, padding=1), nn.ReLU(),
                             nn.Upsample(size=image[1:], mode="bilinear", align_corners=False),
                             nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, image[0], 3, padding=1))
    width = int(torch.tensor(given).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 256), nn.ReLU(),
                         nn.Linear(256, image[0] * image[1] * image[2]), nn.Unflatten(1, image))


class Adversary:
    """One edge's decoder and its optimizer, for a first segment ``segment`` that takes inputs of
    ``image`` shape (channels, height, width)."""

    def __init__(self, cfg: PrivacyConfig, segment: nn.Module, image: tuple[int, ...], seed: int,
                 device: torch.device):
        self.weight, self.threshold = cfg.adversary, cfg.adversary_ssim
        given = output_shape(segment, image, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoder = edge_decoder(given, image).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=1e-3)
        self.last_ssim = float("nan")

    def gradient(self, inputs: Tensor, activation: Tensor) -> Tensor:
        """One decoder step on this batch, then the adversary term's gradient at ``activation``
        (zero where the decoder is already below the threshold)."""
        x, z = inputs.detach(), activation.detach()
        # Images in any normalisation: SSIM's constants scale with the range, so the batch's range of
        # input values gives the pixel-space SSIM for data normalised by one mean and std.
        span = float(x.max() - x.min()) or 1.0
        with torch.enable_grad():
            loss = F.mse_loss(self.decoder(z), x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            z = z.requires_grad_()
            quality = ssim(self.decoder(z), x, span).mean()  # the audit's SSIM
            self.last_ssim = float(quality.detach())
            if self.last_ssim <= self.threshold:
                return torch.zeros_like(z)
            extra, = torch.autograd.grad(self.weight * (quality - self.threshold), z)
        return extra

    def state(self) -> dict[str, Any]:
        """For the edge's own checkpoint part: the decoder and its optimizer, on the CPU."""
        return {"decoder": on_cpu(self.decoder.state_dict()), "optimizer": on_cpu(self.optimizer.state_dict())}

    def load(self, state: dict[str, Any]) -> None:
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
