"""Data sets by name: torchvision's image-classification sets and folders of labelled images.

Every set becomes two ``Source``s (train, test) that hand out normalised batches by index. The
array-backed sets (the MNIST family, CIFAR, SVHN) are held as one uint8 tensor, which is what
torchvision itself reads (CIFAR-10 150 MB, SVHN 230 MB, EMNIST byclass 550 MB), and normalised a
batch at a time; an image folder is never held: each batch is decoded from its files when asked
for (by DataLoader workers on the side that holds the data).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from split_trainer.config import ConfigError, DataConfig

Tensor = torch.Tensor
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10}


@dataclass(frozen=True)
class Spec:
    """What a model needs to know of a data set, and how its pixels are normalised."""
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def shape(self) -> dict[str, int]:
        return {"in_channels": self.channels, "image_size": self.size, "num_classes": self.classes}


# Standard per-channel statistics of each training split (the pytorch/examples values for MNIST).
SPECS = {
    "mnist": Spec(1, 28, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": Spec(1, 28, 10, (0.2860,), (0.3530,)),
    "kmnist": Spec(1, 28, 10, (0.1918,), (0.3483,)),
    "emnist": Spec(1, 28, 47, (0.1751,), (0.3332,)),  # classes by data.emnist_split
    "cifar10": Spec(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Spec(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": Spec(3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
LAYOUTS = {
    "mnist": "the four IDX files {files} (gzip or raw) directly in data.root or in data.root/MNIST/raw",
    "fashion_mnist": "the four IDX files {files} (gzip or raw) directly in data.root or in data.root/FashionMNIST/raw",
    "kmnist": "the four IDX files {files} (gzip or raw) directly in data.root or in data.root/KMNIST/raw",
    "emnist": "emnist-SPLIT-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte (gzip or raw) directly in data.root or "
              "in data.root/EMNIST/raw",
    "cifar10": "data.root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta: cifar-10-python.tar.gz "
               "unpacked)",
    "cifar100": "data.root/cifar-100-python/ (train, test, meta: cifar-100-python.tar.gz unpacked)",
    "svhn": "data.root/train_32x32.mat and data.root/test_32x32.mat",
    "image_folder": "data.root/train/<class>/<image> and data.root/test/<class>/<image>",
    "csv": "data.root/<party>/train.csv and test.csv (an id column, then feature columns) for each edge party, "
           "data.root/labels/train.csv and test.csv (id, label) for the label party",
}


def spec_of(cfg: DataConfig, root_classes: Optional[int] = None) -> Spec:
    """The data set's spec from the config alone (an image folder's class count from the folder
    when this rank holds it, else data.num_classes)."""
    if cfg.name == "emnist":
        return dataclasses.replace(SPECS["emnist"], classes=EMNIST_CLASSES[cfg.emnist_split])
    if cfg.name == "csv":  # a table: each party holds and standardises its own columns
        return Spec(1, 1, cfg.num_classes, (0.0,), (1.0,))
    if cfg.name != "image_folder":
        return SPECS[cfg.name]
    classes = cfg.num_classes or root_classes or _folder_classes(Path(cfg.root))
    if not classes:
        raise ConfigError(f"data.root={cfg.root} has no class folders in train/: put the images in "
                          f"{LAYOUTS['image_folder']}, or set data.num_classes (the central of an "
                          f"edge-placement run holds no images to count)")
    mean = tuple(cfg.mean) if cfg.mean else (0.5,) * cfg.channels
    std = tuple(cfg.std) if cfg.std else (0.5,) * cfg.channels
    return Spec(cfg.channels, cfg.image_size, classes, mean, std)


def _folder_classes(root: Path) -> int:
    train = root / "train"
    return sum(1 for p in train.iterdir() if p.is_dir()) if train.is_dir() else 0


class Source:
    """Samples by index: labels for all of them at once (partitions, counts), normalised images a
    batch at a time."""

    def __init__(self, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
        self.labels = labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, idx: Tensor) -> Tensor:
        """uint8 images, N x C x H x W."""
        raise NotImplementedError

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        # contiguous and freshly allocated: a view would put its whole parent on the wire
        x = self.pixels(idx).float().div_(255).sub_(self.mean).div_(self.std)
        return x, self.labels[idx]

    def subset(self, idx: Tensor) -> "Source":
        raise NotImplementedError


class ArraySource(Source):
    def __init__(self, data: Tensor, labels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(labels, mean, std)
        self.data = data  # uint8, N x C x H x W

    def pixels(self, idx: Tensor) -> Tensor:
        return self.data[idx]

    def subset(self, idx: Tensor) -> "ArraySource":
        return ArraySource(self.data[idx], self.labels[idx], tuple(self.mean.flatten().tolist()),
                           tuple(self.std.flatten().tolist()))


class FolderSource(Source):
    """Image files, decoded, converted to ``channels`` and resized to ``size`` when a batch is asked for."""

    def __init__(self, paths: list[str], labels: Tensor, channels: int, size: int, mean, std):
        super().__init__(labels, mean, std)
        self.paths, self.channels, self.size = paths, channels, size

    def pixels(self, idx: Tensor) -> Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        images = []
        for i in idx.tolist():
            try:
                with Image.open(self.paths[i]) as img:
                    img = img.convert("L" if self.channels == 1 else "RGB")
                    if img.size != (self.size, self.size):
                        img = img.resize((self.size, self.size), Image.BILINEAR)
                    images.append(pil_to_tensor(img))
            except (OSError, ValueError, SyntaxError) as exc:  # PIL's words for a file that is no image
                raise ConfigError(f"{self.paths[i]} is not an image that can be read ({str(exc)[:120]}): replace "
                                  f"or remove it") from None
        return torch.stack(images)

    def subset(self, idx: Tensor) -> "FolderSource":
        return FolderSource([self.paths[i] for i in idx.tolist()], self.labels[idx], self.channels, self.size,
                            tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))


# -- reading each kind -------------------------------------------------------------------------
MAX_IDX_BYTES = 2 ** 31
"""The most data an IDX file may declare (EMNIST byclass, the largest, holds 0.55 GB)."""


def _read_idx(path: Path) -> Tensor:
    """An IDX file (gzip or raw): the MNIST family's format, uint8 data with big-endian int32 dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise ValueError(f"{path} is not an IDX file of unsigned bytes")
        header = f.read(4 * head[3])
        dims = [int.from_bytes(header[4 * i: 4 * i + 4], "big") for i in range(len(header) // 4)]
        expected = math.prod(dims)
        if len(dims) != head[3]:
            raise ValueError(f"{path}: its header is cut short")
        if expected > MAX_IDX_BYTES:
            raise ValueError(f"{path}: its header declares {expected:,} bytes of data, more than any data set's "
                             f"({MAX_IDX_BYTES:,})")
        # Never more than the header declares (and one byte to tell a longer file): a small gzip
        # file cannot inflate into memory beyond it.
        data = bytearray(f.read(expected + 1))  # writable, so the tensor below is a view of it, not a copy
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)}{'+' if len(data) > expected else ''} bytes of data, the header "
                         f"says {expected}")
    return torch.frombuffer(data, dtype=torch.uint8, count=expected).view(tuple(dims)) if expected else \
        torch.zeros(dims, dtype=torch.uint8)


def _check_idx(x: Tensor, y: Tensor, images: Path, labels: Path, spec: Spec) -> None:
    """One split's images and labels fit each other and the set's spec (ValueError naming the file)."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (spec.size, spec.size):
        raise ValueError(f"{images}: images of shape {tuple(x.shape[1:])}, expected ({spec.size}, {spec.size})")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{labels}: {tuple(y.shape)} labels for the {len(x)} images of {images.name}")
    if len(y) and int(y.max()) >= spec.classes:
        raise ValueError(f"{labels}: a label {int(y.max())}, outside the set's classes 0..{spec.classes - 1}")


_MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST", "emnist": "EMNIST"}
_MNIST_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


def _torchvision_datasets():
    """torchvision.datasets, imported where a set is downloaded or read through it: every rank of a
    job on the IDX files starts half a second sooner without it, at every restart."""
    from torchvision import datasets

    return datasets


def _idx_names(cfg: DataConfig) -> tuple[str, ...]:
    if cfg.name == "emnist":
        return tuple(f"emnist-{cfg.emnist_split}-{part}" for part in
                     ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "test-images-idx3-ubyte",
                      "test-labels-idx1-ubyte"))
    return MNIST_FILES


def _find_idx(root: Path, cfg: DataConfig) -> dict[str, Optional[Path]]:
    folders = (root, root / _MNIST_FOLDERS[cfg.name] / "raw")
    found = {}
    for name in _idx_names(cfg):
        found[name] = next((c for f in folders for c in (f / name, f / f"{name}.gz") if c.is_file()), None)
    return found


def _layout(cfg: DataConfig) -> str:
    """Where the configured set's files go, for messages."""
    return LAYOUTS[cfg.name].format(files=", ".join(_idx_names(cfg)))


def _load_idx_family(cfg: DataConfig, spec: Spec) -> tuple[Source, Source]:
    root = Path(cfg.root).expanduser()
    found = _find_idx(root, cfg)
    if any(p is None for p in found.values()) and cfg.download:
        _download(cfg, root)
        found = _find_idx(root, cfg)
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ConfigError(f"data.root={root} lacks {cfg.name} file(s) {', '.join(missing)} (gzip or raw): put "
                          f"{_layout(cfg)}, or set data.root=DIR"
                          + ("" if cfg.download else ", or data.download=true to fetch them"))
    try:
        arrays = [_read_idx(path) for path in found.values()]
        for (x, y), (images, labels) in zip((arrays[:2], arrays[2:]), (list(found.values())[:2], list(found.values())[2:])):
            _check_idx(x, y, images, labels, spec)
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # a truncated gzip is EOFError, a corrupt one zlib's
        raise ConfigError(f"{cfg.name} files in {root} are not valid IDX files ({exc}): replace them") from None
    train_x, train_y, test_x, test_y = arrays
    return (ArraySource(train_x.unsqueeze(1), train_y.long(), spec.mean, spec.std),
            ArraySource(test_x.unsqueeze(1), test_y.long(), spec.mean, spec.std))


def _download(cfg: DataConfig, root: Path) -> None:
    """torchvision's own download, into a temporary folder that is moved into data.root only when
    complete (an interrupted download leaves nothing behind); offline, one line that says what to
    put where."""
    tmp = root / f".download-{os.getpid()}"
    datasets = _torchvision_datasets()
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(cfg.download_timeout_s)  # a silent network fails instead of hanging
    try:
        if cfg.name == "emnist":
            datasets.EMNIST(str(tmp), split=cfg.emnist_split, download=True)
        elif cfg.name in _MNIST_CLASSES:
            getattr(datasets, _MNIST_CLASSES[cfg.name])(str(tmp), download=True)
        elif cfg.name in ("cifar10", "cifar100"):
            (datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100)(str(tmp), download=True)
        else:
            for split in ("train", "test"):
                datasets.SVHN(str(tmp), split=split, download=True)
        for item in tmp.rglob("*"):
            target = root / item.relative_to(tmp)
            if item.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, target)
    except Exception as exc:  # no network, a proxy, a full disk: one line, never a traceback
        reason = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"could not download {cfg.name} into {root} ({reason}): on a machine without internet "
                          f"put {_layout(cfg)} there yourself") from None
    finally:
        socket.setdefaulttimeout(previous)
        shutil.rmtree(tmp, ignore_errors=True)


def _load_torchvision(cfg: DataConfig, spec: Spec) -> tuple[Source, Source]:
    """CIFAR-10/100 and SVHN through torchvision, which checks each file's MD5 before reading it."""
    root, datasets = Path(cfg.root).expanduser(), _torchvision_datasets()
    try:
        if cfg.name == "svhn":
            parts = [datasets.SVHN(str(root), split=s, download=False) for s in ("train", "test")]
            arrays = [(torch.from_numpy(p.data), torch.from_numpy(p.labels).long()) for p in parts]
        else:
            kind = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
            parts = [kind(str(root), train=t, download=False) for t in (True, False)]
            arrays = [(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets))
                      for p in parts]
    except RuntimeError:  # "Dataset not found or corrupted"
        if not cfg.download:
            raise ConfigError(f"data.root={root} lacks {cfg.name} (or a file fails its checksum): put "
                              f"{_layout(cfg)} there, or set data.download=true") from None
        _download(cfg, root)
        return _load_torchvision(dataclasses.replace(cfg, download=False), spec)
    return tuple(ArraySource(x, y, spec.mean, spec.std) for x, y in arrays)


def _load_folder(cfg: DataConfig) -> tuple[Source, Source, Spec]:
    root = Path(cfg.root).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ConfigError(f"data.root={root} is not an image folder: put {LAYOUTS['image_folder']} there")
    datasets = _torchvision_datasets()
    try:
        train = datasets.ImageFolder(str(root / "train"))
        test = datasets.ImageFolder(str(root / "test"))
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"image folder {root}: {str(exc).splitlines()[0][:200]}") from None
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise ConfigError(f"image folder {root}: test classes {', '.join(unknown)} have no training folder")
    index = {name: i for i, name in enumerate(train.classes)}
    for ds in (train, test):  # by file name, then class: a folder written from an indexed set keeps its order
        ds.samples.sort(key=lambda sample: (Path(sample[0]).name, sample[1]))
    if cfg.num_classes is not None and cfg.num_classes != len(train.classes):
        raise ConfigError(f"data.num_classes={cfg.num_classes}, but {root}/train has {len(train.classes)} class "
                          f"folders: fix data.num_classes or the folder")
    spec = spec_of(cfg, len(train.classes))
    sources = []
    for ds in (train, test):
        labels = torch.tensor([index[ds.classes[c]] for _, c in ds.samples], dtype=torch.long)
        sources.append(FolderSource([p for p, _ in ds.samples], labels, spec.channels, spec.size, spec.mean, spec.std))
    if cfg.mean is None or cfg.std is None:  # once, from the training images this rank holds
        mean, std = _statistics(sources[0])
        flat = [c for c, v in enumerate(std.tolist()) if not v > 1e-6]  # one value throughout: x / 0 is inf
        if flat:
            raise ConfigError(f"image folder {root}/train: channel {flat[0]} holds one value in every training "
                              f"image (std 0), and normalising would divide by 0: set data.mean and data.std")
        for source in sources:
            source.mean, source.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
        spec = dataclasses.replace(spec, mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    return sources[0], sources[1], spec


def _statistics(source: Source, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of a source's pixels in [0, 1], in one streamed pass."""
    total = squares = 0.0
    count = 0
    for idx in torch.arange(len(source)).split(batch):
        x = source.pixels(idx).double().div_(255)
        total = total + x.sum((0, 2, 3))
        squares = squares + (x * x).sum((0, 2, 3))
        count += x.numel() // x.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean ** 2).clamp_min(0).sqrt().float()


def load(cfg: DataConfig) -> tuple[Source, Source, Spec]:
    """(train, test, spec) of the configured data set, with data.limit_train / limit_test applied."""
    if cfg.name == "image_folder":
        train, test, spec = _load_folder(cfg)
    elif cfg.name in ("cifar10", "cifar100", "svhn"):
        spec = spec_of(cfg)
        train, test = _load_torchvision(cfg, spec)
    else:
        spec = spec_of(cfg)
        train, test = _load_idx_family(cfg, spec)
    if cfg.limit_train is not None:
        train = train.subset(torch.arange(min(cfg.limit_train, len(train))))
    if cfg.limit_test is not None:
        test = test.subset(torch.arange(min(cfg.limit_test, len(test))))
    return train, test, spec
