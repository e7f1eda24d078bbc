"""A malicious central: the feature-space hijacking attack (FSHA; Pasquini, Ateniese, Bernaschi,
"Unleashing the Tiger: Inference Attacks on Split Learning", CCS 2021).

The central needs no edge weights. On public images it trains a *pilot* (a network with the edge
segment's architecture, its own weights) and a *decoder* that inverts the pilot, and a
*discriminator* that tells the pilot's features from the edge's. What it sends an edge instead of
the task's gradient is the gradient that makes the edge's features pass for the pilot's: the edge,
running its own code, steps its segment into a feature space the central can invert. After
enough steps the decoder gives the edge's private inputs back.

The discriminator's loss is the non-saturating GAN loss (binary cross-entropy on logits), not the
paper's WGAN-GP: in 400 steps against a real edge the WGAN-GP critic (penalty 500) gave SSIM
-0.14 where this one gave 0.31 (docs/privacy.md#a-malicious-central). Everything here is the
attacker's own computation; training.malicious runs it against real edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from split_trainer.privacy.attacks import fresh_clone, make_decoder

Tensor = torch.Tensor
AUTOENCODER_LR, CRITIC_LR = 1e-3, 1e-4  # Adam; the pilot and decoder at the audit decoders' rate (1e-4 left them blurry in 400 steps)


def discriminator(shape: tuple[int, ...]) -> nn.Module:
    """Features (the cut's shape) -> one logit: strided convolutions for a feature map, an MLP for a vector."""
    if len(shape) == 3 and shape[1] * shape[2] > 1:
        return nn.Sequential(nn.Conv2d(shape[0], 64, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                             nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                             nn.Flatten(), nn.LazyLinear(1))
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(512), nn.LeakyReLU(0.2), nn.Linear(512, 1))


class Hijacker:
    """The attacker's three networks and its step: ``gradient(received)`` trains them on one
    public batch and the edge features just received, and returns what to send the edge back."""

    def __init__(self, segment: nn.Module, public: Tensor, public_pixels: Tensor, seed: int, batch: int):
        torch.manual_seed(seed)
        self.pilot = fresh_clone(segment)  # the edge segment's architecture, weights of its own
        with torch.no_grad():
            shape = tuple(self.pilot(public[:2]).shape[1:])
        self.decoder = make_decoder("residual", shape, tuple(public_pixels.shape[1:]))
        self.critic = discriminator(shape)
        with torch.no_grad():
            self.critic(torch.zeros(2, *shape))  # sizes its lazy layer before the optimizer sees it
        self.public, self.public_pixels, self.batch = public, public_pixels, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.autoencoder = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], lr=AUTOENCODER_LR)
        self.judge = torch.optim.Adam(self.critic.parameters(), lr=CRITIC_LR)

    def gradient(self, received: Tensor) -> Tensor:
        """One step of the attack on the edge features ``received`` (a private batch's)."""
        idx = torch.randint(len(self.public), (self.batch,), generator=self.gen)
        x, pixels = self.public[idx], self.public_pixels[idx]
        features = self.pilot(x)
        loss = F.mse_loss(self.decoder(features), pixels)
        self.autoencoder.zero_grad(set_to_none=True)
        loss.backward()
        self.autoencoder.step()
        pilot, edge = self.critic(features.detach()), self.critic(received.detach())
        loss = (F.binary_cross_entropy_with_logits(pilot, torch.ones_like(pilot))
                + F.binary_cross_entropy_with_logits(edge, torch.zeros_like(edge)))
        self.judge.zero_grad(set_to_none=True)
        loss.backward()
        self.judge.step()
        forged = received.detach().requires_grad_(True)  # the edge's features should pass for the pilot's
        verdict = self.critic(forged)
        fool = F.binary_cross_entropy_with_logits(verdict, torch.ones_like(verdict))
        grad, = torch.autograd.grad(fool, forged)
        return grad

    @torch.no_grad()
    def decode(self, received: Tensor) -> Tensor:
        """The private images back, in pixels, from the features the central received."""
        self.decoder.eval()
        try:
            return torch.cat([self.decoder(b) for b in received.split(256)]).clamp(0, 1)
        finally:
            self.decoder.train()
