"""An honest-but-curious central's attacks on what it receives, and how their results are scored
(used by ``python -m split_trainer audit``, split_trainer.privacy.audit).

Inputs, from the activation at a cut:
- ``decoder``: a network trained on public images' activations to give the images back (the central
  knows the edge weights, so it can make such pairs; under an activation defence it noises them the
  same way).
- ``inversion``: an input optimised until its activation matches the received one (edge weights known).
- ``unsplit``: a clone of the edge segment, initialised anew, optimised together with the inputs (the
  architecture alone; Erdogan et al., UnSplit, 2022).
Labels, in a U-shaped plan: clustering of the gradients the edge sends back, and of the central's own
features at the last cut, matched to the true labels at best.

Images are compared in pixel space, [0, 1].
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Receive = Callable[[Tensor], Tensor]  # images (normalised) -> what the central receives at a cut


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=gen).split(size))


def decoder_attack(receive: Receive, public: Tensor, public_pixels: Tensor, private_received: Tensor,
                   epochs: int, seed: int) -> Tensor:
    """Train a decoder from what ``receive`` gives for the public images back to their pixels;
    decode the private activations."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        pairs = torch.cat([receive(b) for b in public.split(256)])
    decoder = _decoder(tuple(pairs.shape[1:]), tuple(public_pixels.shape[1:]))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in _batches(len(public), 128, gen):
            loss = F.mse_loss(decoder(pairs[idx]), public_pixels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return torch.cat([decoder(b) for b in private_received.split(256)]).clamp(0, 1)


def _decoder(given: tuple[int, ...], image: tuple[int, ...]) -> nn.Module:
    """Convolutions for a feature map with room in it, a multilayer perceptron for a vector."""
    if len(given) == 3 and given[1] * given[2] > 1:
        return nn.Sequential(nn.Conv2d(given[0], 64, 3, padding=1), nn.ReLU(),
                             nn.Upsample(size=image[1:], mode="bilinear", align_corners=False),
                             nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, image[0], 3, padding=1))
    width = 1
    for n in given:
        width *= n
    return nn.Sequential(nn.Flatten(), nn.Linear(width, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, image[0] * image[1] * image[2]), nn.Unflatten(1, image))


def stretched(images: Tensor) -> Tensor:
    """Each image's range stretched to [0, 1]: optimised inputs come out at the wrong contrast, and an
    attacker knows what range the images span."""
    low = images.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = images.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (images - low) / (high - low).clamp_min(1e-6)


def inversion_attack(receive: Receive, received: Tensor, start: Tensor, steps: int, tv: float = 0.05) -> Tensor:
    """Optimise inputs, from ``start``, until their activations match ``received``."""
    x = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        loss = F.mse_loss(receive(x), received) + tv * total_variation(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return x.detach()


def unsplit_attack(segment: nn.Module, received: Tensor, start: Tensor, rounds: int, seed: int,
                   tv: float = 0.05) -> Tensor:
    """UnSplit: a fresh clone of the edge segment and the inputs, optimised in turn to match ``received``."""
    torch.manual_seed(seed)
    clone = copy.deepcopy(segment).train()
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # the architecture, not the weights
    x = start.clone().requires_grad_()
    inputs, weights = torch.optim.Adam([x], lr=0.05), torch.optim.Adam(clone.parameters(), lr=1e-3)
    for _ in range(rounds):
        for optimizer in (inputs, weights):
            for _ in range(10):
                loss = F.mse_loss(clone(x), received) + tv * total_variation(x)
                inputs.zero_grad(set_to_none=True)
                weights.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return x.detach()


def kmeans(points: Tensor, k: int, seed: int, iterations: int = 50) -> Tensor:
    """Cluster labels of ``points`` (k-means++ start, Lloyd's iterations). A model that learned
    nothing can give identical or non-finite points: they cluster (trivially) rather than fail."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)
    centres = points[torch.randint(len(points), (1,), generator=gen)]
    for _ in range(1, k):
        distance = torch.cdist(points, centres).min(1).values ** 2
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centres = torch.cat([centres, points[torch.multinomial(weights, 1, generator=gen)]])
    for _ in range(iterations):
        assigned = torch.cdist(points, centres).argmin(1)
        centres = torch.stack([points[assigned == c].mean(0) if (assigned == c).any() else centres[c]
                               for c in range(k)])
    return torch.cdist(points, centres).argmin(1)


def matched_accuracy(clusters: Tensor, labels: Tensor, k: int) -> float:
    """Accuracy of the best one-to-one naming of clusters by labels: how well the partition the
    attacker found separates the classes, whatever names it would give them."""
    from scipy.optimize import linear_sum_assignment

    counts = torch.zeros(k, k)
    counts.index_put_((clusters, labels), torch.ones(len(labels)), accumulate=True)
    rows, cols = linear_sum_assignment(-counts.numpy())
    return float(counts[rows, cols].sum() / len(labels))


def norm_auc(gradients: Tensor, labels: Tensor) -> float:
    """Two classes: the AUC of per-sample gradient norms as a score for label 1 (norm attack)."""
    scores = gradients.flatten(1).norm(dim=1)
    positive, negative = scores[labels == 1], scores[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        return 0.5
    return float((positive[:, None] > negative[None, :]).float().mean())


# -- scoring -----------------------------------------------------------------------------------
def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM of images in [0, 1] (pytorch-msssim, 7x7 Gaussian window for small images)."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(a, b, data_range=1.0, size_average=False, win_size=7)


def scores(reconstructed: Tensor, original: Tensor, class_means: Tensor) -> dict[str, float]:
    """MSE, PSNR and SSIM of reconstructions, and the SSIM of the class-mean image (what the label
    alone tells) against the same originals."""
    mse = ((reconstructed - original) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return {"mse": float(mse.mean()), "psnr_db": float((10 * torch.log10(1 / mse)).mean()),
            "ssim": float(ssim(reconstructed, original).mean()),
            "class_mean_ssim": float(ssim(class_means, original).mean())}


def _centred(images: Tensor) -> Tensor:
    flat = images.flatten(1)
    return flat - flat.mean(1, keepdim=True)


def reidentified(reconstructed: Tensor, targets: Tensor, pool: Tensor, pool_labels: Tensor, labels: Tensor,
                 candidates: int, seed: int) -> tuple[float, float]:
    """(share of reconstructions nearest their own original among ``candidates`` private images of
    the same class, chance). ``targets`` index into ``pool``."""
    gen = torch.Generator().manual_seed(seed)
    hits, chance = 0, 0.0
    for recon, target, label in zip(reconstructed, targets, labels):
        same = (pool_labels == label).nonzero().flatten()
        others = same[same != target]
        chosen = torch.cat([target.view(1), others[torch.randperm(len(others), generator=gen)[:candidates - 1]]])
        # Correlation, not distance: the attacker's best guess whatever the reconstruction's contrast.
        similarity = F.cosine_similarity(_centred(pool[chosen]), _centred(recon.unsqueeze(0)), dim=1)
        hits += int(chosen[similarity.argmax()] == target)
        chance += 1 / len(chosen)
    return hits / len(targets), chance / len(targets)
