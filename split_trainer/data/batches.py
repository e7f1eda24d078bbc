"""Batches: the seeded order of an epoch, the loader that gathers (or decodes) them, and the
seeded augmentation. Which data set the samples come from is split_trainer.data.datasets' business."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from split_trainer.data.datasets import Source

Tensor = torch.Tensor


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """The index batches of one epoch: a permutation that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


def index_batches(n: int, batch_size: int) -> list[Tensor]:
    """Evaluation's batches: in order, never shuffled."""
    return list(torch.arange(n).split(batch_size))


class _Batches(Dataset):
    """Indexed by a whole index tensor, so a worker gathers (or decodes) a batch in one go."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.source.batch(idx)


def batch_loader(source: Source, order: list[Tensor], num_workers: int) -> DataLoader:
    """Yield (images, labels) for each index batch in ``order``, in order; with workers, the next
    batches are gathered or decoded in other processes while this one trains."""
    # A private generator: the loader draws a base seed when it starts, and drawing it from the
    # global RNG would shift the dropout masks of a resumed run against an uninterrupted one.
    return DataLoader(_Batches(source), batch_size=None, sampler=order, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False)


def crop_flip(x: Tensor, seed: int, epoch: int, index: int, padding: int = 4) -> Tensor:
    """Random crop after zero padding (zero: the mean pixel, the batch being normalised) and a
    random horizontal flip, per sample, drawn from (seed, epoch, batch index) alone: the same
    batch at the same position is augmented the same way in a resumed run."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist()
    padded = F.pad(x, (padding,) * 4)
    out = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    flip = torch.tensor(flips)
    out[flip] = out[flip].flip(-1)
    return out
