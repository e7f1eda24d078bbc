"""MNIST through torchvision, held in memory as normalised tensors, with a seeded batch order.

The IDX files may sit in ``data.root`` directly (gzip or raw) or in torchvision's
``MNIST/raw`` layout. torchvision only reads raw files in its own layout, and the shared data
folder is read-only, so gzip files are decompressed into a temporary folder that is deleted
as soon as the tensors are loaded.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from .config import ConfigError, DataConfig

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN, STD = 0.1307, 0.3081  # the pytorch/examples normalisation


@dataclass
class Split:
    images: torch.Tensor  # float32, N x 1 x 28 x 28, normalised
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _to_split(ds: datasets.MNIST, limit: int | None) -> Split:
    images = ds.data[:limit].unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    return Split(images.contiguous(), ds.targets[:limit].clone())


def load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    """Return (train, test) splits, or raise ConfigError saying where the files must go."""
    root = Path(cfg.root).expanduser()
    found = {name: _find(root, name) for name in FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing and cfg.download:
        try:
            return tuple(_to_split(datasets.MNIST(str(root), train=t, download=True), lim)
                         for t, lim in ((True, cfg.limit_train), (False, cfg.limit_test)))
        except Exception as exc:  # network or disk: say so in one line
            raise ConfigError(f"could not download MNIST into {root}: {exc}") from None
    if missing:
        raise ConfigError(f"data.root={root} lacks MNIST file(s) {', '.join(missing)} (gzip or raw): put the four "
                          f"IDX files there, or set data.root=DIR, or data.download=true to fetch them")
    with tempfile.TemporaryDirectory(prefix="split_trainer_mnist_") as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name, path in found.items():
            try:
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rb") as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except OSError as exc:
                raise ConfigError(f"cannot read MNIST file {path}: {exc}") from None
        try:
            return (_to_split(datasets.MNIST(tmp, train=True), cfg.limit_train),
                    _to_split(datasets.MNIST(tmp, train=False), cfg.limit_test))
        except Exception as exc:  # truncated or foreign files
            raise ConfigError(f"MNIST files in {root} are not valid IDX files ({exc}): replace them") from None


def epoch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The index batches of one epoch: a permutation that depends only on (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


class _Batches(Dataset):
    """Indexed by a whole index tensor, so the loader fetches a batch in one gather."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[idx], self.split.labels[idx]


def batch_loader(split: Split, order: list[torch.Tensor], num_workers: int) -> DataLoader:
    """Yield (images, labels) for each index batch in ``order``, in order."""
    # A private generator: the loader draws a base seed when it starts, and drawing it from the
    # global RNG would shift the dropout masks of a resumed run against an uninterrupted one.
    return DataLoader(_Batches(split), batch_size=None, sampler=order, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))


def eval_batches(split: Split, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # clone: a view would put its whole parent storage on the wire
    return [(x.clone(), y.clone()) for x, y in zip(split.images.split(batch_size), split.labels.split(batch_size))]
