"""An honest-but-curious central's attacks on what it receives, and how their results are scored
(used by ``python -m split_trainer audit``, split_trainer.privacy.audit).

Inputs, from the activation at a cut:
- ``decoder``: networks trained on public images' activations to give the images back (the central
  knows the edge weights, so it can make such pairs; under an activation defence it noises them the
  same way). Decoders of more than one capacity (``DECODERS``: ``small``, ``residual``), each from
  scratch on the same pairs for the same budget, and the audit reports the worst case among them
  (``worst_case``): a defence tuned against one decoder architecture must hold against the others.
- ``inversion``: an input optimised until its activation matches the received one (edge weights known).
- ``unsplit``: a clone of the edge segment, initialised anew, optimised together with the inputs (the
  architecture alone; Erdogan et al., UnSplit, 2022).
Labels, in a U-shaped plan: clustering of the gradients the edge sends back, and of the central's own
features at the last cut, matched to the true labels at best.

Images are compared in pixel space, [0, 1].
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Receive = Callable[[Tensor], Tensor]  # images (normalised) -> what the central receives at a cut
Tick = Optional[Callable[[str, int, int], None]]
"""Told (attack, done, total) as an attack goes: its epochs, steps or rounds (the audit's progress lines)."""


def _told(tick: Tick, what: str, done: int, total: int) -> None:
    if tick is not None:
        tick(what, done, total)


def total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=gen).split(size))


DECODERS = ("small", "residual")  # capacities, in the order (and with the seed offsets) they are trained
DECODER_LR, DECODER_BATCH = 1e-3, 128  # every capacity's budget, with the number of epochs


def decoder_attack(receive: Receive, public: Tensor, public_pixels: Tensor, private_received: Tensor,
                   epochs: int, seed: int, kinds: tuple[str, ...] = DECODERS,
                   tick: Tick = None) -> dict[str, tuple[Tensor, int]]:
    """For each capacity in ``kinds``: a decoder trained from scratch, from what ``receive`` gives
    for the public images back to their pixels, on the same pairs for the same budget; its decoding
    of the private activations, and its parameter count."""
    torch.manual_seed(seed)
    with torch.no_grad():
        pairs = torch.cat([receive(b) for b in public.split(256)])
    decoded = {}
    for kind in kinds:
        index = DECODERS.index(kind)
        # Each capacity draws from its own seed, whichever others run: `--decoders residual` gives
        # the residual numbers of the default. The small one continues the stream the pairs left,
        # as the single decoder before it did, so its numbers are today's bit for bit.
        with torch.random.fork_rng(devices=[]):
            if index:
                torch.manual_seed(seed + index)
            decoder = make_decoder(kind, tuple(pairs.shape[1:]), tuple(public_pixels.shape[1:]))
            _fit(decoder, pairs, public_pixels, epochs, torch.Generator().manual_seed(seed + index),
                 lambda done: _told(tick, f"decoder[{kind}]", done, epochs))
        with torch.no_grad():
            images = torch.cat([decoder(b) for b in private_received.split(256)]).clamp(0, 1)
        decoded[kind] = (images, sum(p.numel() for p in decoder.parameters()))
    return decoded


def _fit(decoder: nn.Module, pairs: Tensor, pixels: Tensor, epochs: int, gen: torch.Generator,
         epoch_done: Callable[[int], None] = lambda done: None) -> None:
    """The budget every capacity gets: ``epochs`` passes, Adam, the same batches' size, MSE."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=DECODER_LR)
    for epoch in range(epochs):
        epoch_done(epoch)
        for idx in _batches(len(pairs), DECODER_BATCH, gen):
            loss = F.mse_loss(decoder(pairs[idx]), pixels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    epoch_done(epochs)


def make_decoder(kind: str, given: tuple[int, ...], image: tuple[int, ...]) -> nn.Module:
    """Convolutions for a feature map with room in it, a multilayer perceptron for a vector.
    ``small``: the audit's original decoder (about 27M multiply-adds per MNIST image from a
    64x12x12 cut). ``residual``: more depth at the cut's resolution, two residual blocks (about
    48M); for a vector, three hidden layers of 2048 against two of 1024. Two capacities, so that a
    defence trained against one decoder (privacy.adversary) cannot pass by overfitting to it."""
    width = 1
    for n in given:
        width *= n
    pixels = image[0] * image[1] * image[2]
    if len(given) == 3 and given[1] * given[2] > 1:
        head = [nn.Conv2d(given[0], 64, 3, padding=1), nn.ReLU()]
        if kind == "residual":
            head += [_Residual(64), _Residual(64)]
        return nn.Sequential(*head, nn.Upsample(size=image[1:], mode="bilinear", align_corners=False),
                             nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, image[0], 3, padding=1))
    hidden = [1024, 1024] if kind == "small" else [2048, 2048, 2048]
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip([width, *hidden], hidden):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1], pixels), nn.Unflatten(1, image))


class _Residual(nn.Module):
    """conv3x3-ReLU-conv3x3 plus the input, then ReLU: depth that still trains in a few epochs."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def worst_case(rows: dict[str, dict[str, float]]) -> str:
    """The name of the row an attacker would rather have: the highest re-identification rate,
    ties broken by the higher SSIM (then the first named). What a defence must beat is the best
    of the decoders, not the one it was trained against."""
    return max(rows, key=lambda name: (rows[name]["reidentified"], rows[name]["ssim"]))


def stretched(images: Tensor) -> Tensor:
    """Each image's range stretched to [0, 1]: optimised inputs come out at the wrong contrast, and an
    attacker knows what range the images span."""
    low = images.flatten(1).amin(1).view(-1, 1, 1, 1)
    high = images.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (images - low) / (high - low).clamp_min(1e-6)


def inversion_attack(receive: Receive, received: Tensor, start: Tensor, steps: int, tv: float = 0.05,
                     tick: Tick = None) -> Tensor:
    """Optimise inputs, from ``start``, until their activations match ``received``."""
    x = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([x], lr=0.05)
    for step in range(steps):
        _told(tick, "inversion", step, steps)
        loss = F.mse_loss(receive(x), received) + tv * total_variation(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _told(tick, "inversion", steps, steps)
    return x.detach()


def unsplit_attack(segment: nn.Module, received: Tensor, start: Tensor, rounds: int, seed: int,
                   tv: float = 0.05, tick: Tick = None) -> Tensor:
    """UnSplit: a fresh clone of the edge segment and the inputs, optimised in turn to match ``received``."""
    torch.manual_seed(seed)
    clone = fresh_clone(segment)
    x = start.clone().requires_grad_()
    inputs, weights = torch.optim.Adam([x], lr=0.05), torch.optim.Adam(clone.parameters(), lr=1e-3)
    for done in range(rounds):
        _told(tick, "unsplit", done, rounds)
        for optimizer in (inputs, weights):
            for _ in range(10):
                loss = F.mse_loss(clone(x), received) + tv * total_variation(x)
                inputs.zero_grad(set_to_none=True)
                weights.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    _told(tick, "unsplit", rounds, rounds)
    return x.detach()


def fresh_clone(segment: nn.Module) -> nn.Module:
    """The architecture of ``segment``, not its weights: a copy initialised anew, in training mode."""
    clone = copy.deepcopy(segment).train()
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone


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
def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM of images spanning ``data_range`` (pixels: [0, 1]), from pytorch-msssim with a
    7x7 Gaussian window for small images."""
    from pytorch_msssim import ssim as _ssim

    return _ssim(a, b, data_range=data_range, size_average=False, win_size=7)


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
