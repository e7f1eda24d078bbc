"""Data sets by name: each loads from files in its own on-disk format (generated here where
torchvision's loader allows it, the real MNIST otherwise), with the right shape, dtype,
normalisation and class count; missing or broken data is one line."""

import dataclasses
import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch

from split_trainer.config import ConfigError, DataConfig
from split_trainer.data.batches import crop_flip, epoch_order
from split_trainer.data.datasets import MNIST_FILES, SPECS, load


def _write_idx(path: Path, array: torch.Tensor, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_idx_set(folder: Path, names: tuple[str, ...], classes: int, compress: bool, n: int = 40) -> torch.Tensor:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n, dtype=torch.uint8) % classes
    for name, array in zip(names, (images, labels, images[: n // 2], labels[: n // 2])):
        _write_idx(folder / name, array, compress)
    return images


@pytest.mark.parametrize("name, layout, compress", [
    ("mnist", "", True), ("fashion_mnist", "FashionMNIST/raw", False), ("kmnist", "", False),
    ("emnist", "EMNIST/raw", True)])
def test_the_mnist_family_loads_from_its_idx_files(tmp_path, name, layout, compress):
    cfg = DataConfig(name=name, root=str(tmp_path), download=False, emnist_split="balanced")
    names = MNIST_FILES if name != "emnist" else tuple(
        f"emnist-balanced-{p}" for p in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                         "test-images-idx3-ubyte", "test-labels-idx1-ubyte"))
    classes = 47 if name == "emnist" else 10
    images = _fake_idx_set(tmp_path / layout, names, classes, compress)
    train, test, spec = load(cfg)
    assert (len(train), len(test), spec.classes, spec.channels, spec.size) == (40, 20, classes, 1, 28)
    x, y = train.batch(torch.arange(8))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (images[:8].float() / 255 - SPECS[name].mean[0]) / SPECS[name].std[0]
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == [i % classes for i in range(8)]


def test_real_mnist_from_gzip_files(mnist_gz):
    train, test, spec = load(DataConfig(root=str(mnist_gz)))
    assert train.data.shape == (60000, 1, 28, 28) and train.data.dtype == torch.uint8 and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, _ = train.batch(torch.arange(60000))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # the MNIST mean and std


def test_torchvision_raw_layout(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:  # mnist_root holds them decompressed
        shutil.copyfile(mnist_root / name, raw / name)
    train, test, _ = load(DataConfig(root=str(tmp_path), limit_train=100, limit_test=10, download=False))
    assert len(train) == 100 and len(test) == 10


def _png_folder(root: Path, mnist_root: Path, n_train: int, n_test: int) -> None:
    """Real MNIST images written as PNG files, root/{train,test}/<digit>/<index>.png."""
    from PIL import Image

    train, test, _ = load(DataConfig(root=str(mnist_root), limit_train=n_train, limit_test=n_test))
    for split, source in (("train", train), ("test", test)):
        for i in range(len(source)):
            folder = root / split / str(int(source.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.data[i, 0].numpy(), mode="L").save(folder / f"{i:06d}.png")


def test_an_image_folder_loads_decoded_resized_and_normalised(mnist_root, tmp_path):
    _png_folder(tmp_path, mnist_root, 30, 10)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), channels=3, image_size=32, download=False)
    train, test, spec = load(cfg)
    assert (len(train), len(test), spec.classes, spec.channels, spec.size) == (30, 10, 10, 3, 32)
    x, y = train.batch(torch.arange(len(train)))
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32
    # no data.mean / data.std: computed from the training images, so the batch is standardised
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.01
    same = DataConfig(name="image_folder", root=str(tmp_path), channels=1, image_size=28, mean=[0.1307],
                      std=[0.3081], download=False)
    idx_train, _, _ = load(DataConfig(root=str(mnist_root), limit_train=30))
    folder_train, _, _ = load(same)
    # PNG is lossless and files are ordered by name: the very same samples in the same order
    assert torch.equal(folder_train.batch(torch.arange(30))[0], idx_train.batch(torch.arange(30))[0])
    assert torch.equal(folder_train.labels, idx_train.labels)


def test_an_image_folder_of_one_colour_is_one_line_not_a_division_by_zero(tmp_path):
    """All-black training images have std 0: standardised, every input would be NaN."""
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("L", (8, 8)).save(tmp_path / split / label / "0.png")
    cfg = DataConfig(name="image_folder", root=str(tmp_path), channels=1, image_size=8, download=False)
    with pytest.raises(ConfigError, match=r"channel 0 holds one value in every training image \(std 0\)"):
        load(cfg)
    train, _, _ = load(dataclasses.replace(cfg, mean=[0.5], std=[0.5]))  # statistics of your own: fine
    assert torch.isfinite(train.batch(torch.arange(2))[0]).all()


def test_an_image_folder_with_a_file_that_is_no_image_is_one_line_naming_it(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for label, shade in (("a", 0), ("b", 255)):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("L", (8, 8), shade).save(tmp_path / split / label / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match=r"/train/a/1.png is not an image that can be read \(.*\): replace or "
                                          r"remove it$"):
        load(DataConfig(name="image_folder", root=str(tmp_path), channels=1, image_size=8, download=False))


@pytest.mark.parametrize("name, words", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")])
def test_checksummed_sets_without_their_files_say_where_they_go(tmp_path, name, words):
    """CIFAR and SVHN go through torchvision, which checks every file's MD5: generated files cannot
    pass, so the test checks the refusal and the set's shape, not a load."""
    with pytest.raises(ConfigError, match=words):
        load(DataConfig(name=name, root=str(tmp_path), download=False))
    assert SPECS[name].channels == 3 and SPECS[name].size == 32


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match="lacks mnist file"):
        load(DataConfig(root=str(tmp_path), download=False))
    for name in MNIST_FILES:
        (tmp_path / name).write_bytes(b"not idx")
    with pytest.raises(ConfigError, match="not valid IDX files"):
        load(DataConfig(root=str(tmp_path), download=False))
    with pytest.raises(ConfigError, match="is not an image folder"):
        load(DataConfig(name="image_folder", root=str(tmp_path)))


def test_offline_download_is_one_line_and_exit_2(in_process, monkeypatch, tmp_path):
    """A proxy that refuses every connection: an offline machine, as far as the download goes."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = in_process("--set", "topology.edges=1", "topology.transport=loopback", "data.name=fashion_mnist",
                                "data.download=true", f"data.root={tmp_path / 'data'}",
                                f"output.run_dir={tmp_path / 'run'}")
    lines = [l for l in err.splitlines() if l.startswith("split_trainer: [central] error:")]
    assert len(lines) == 1 and "could not download fashion_mnist into" in lines[0], (out + err)[-3000:]
    assert "put the four IDX files" in lines[0] and code == 2
    assert "Traceback" not in out + err and not (tmp_path / "run").exists()


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(1000, 64, 1, 0), epoch_order(1000, 64, 1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], epoch_order(1000, 64, 1, 1)[0])
    assert sorted(torch.cat(a).tolist()) == list(range(1000)) and len(a[-1]) == 1000 - 15 * 64


def test_augmented_batches_depend_only_on_seed_epoch_and_position():
    x = torch.randn(16, 3, 32, 32)
    a, b = crop_flip(x, 1, 2, 5), crop_flip(x.clone(), 1, 2, 5)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, crop_flip(x, 1, 2, 6)) and not torch.equal(a, crop_flip(x, 1, 3, 5))
    assert not torch.equal(a, x)


def _md5(path: Path) -> str:
    import hashlib
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_in_their_own_format_load(tmp_path, monkeypatch, name):
    """Files in CIFAR's on-disk format (pickled batches), generated here; torchvision's list of
    expected checksums is pointed at them, the one thing changed, so that its reader runs on them."""
    import pickle

    from torchvision import datasets

    kind = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = tmp_path / kind.base_folder
    folder.mkdir()
    label_key = "labels" if name == "cifar10" else "fine_labels"
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (12, 3 * 32 * 32), dtype=torch.uint8, generator=gen).numpy()
    for file, _ in kind.train_list + kind.test_list:
        (folder / file).write_bytes(pickle.dumps({"data": pixels, label_key: [i % 10 for i in range(12)]}))
    (folder / kind.meta["filename"]).write_bytes(pickle.dumps({kind.meta["key"]: [f"c{i}" for i in range(100)]}))
    monkeypatch.setattr(kind, "train_list", [[f, _md5(folder / f)] for f, _ in kind.train_list])
    monkeypatch.setattr(kind, "test_list", [[f, _md5(folder / f)] for f, _ in kind.test_list])
    monkeypatch.setattr(kind, "meta", {**kind.meta, "md5": _md5(folder / kind.meta["filename"])})
    train, test, spec = load(DataConfig(name=name, root=str(tmp_path), download=False))
    assert len(train) == 12 * len(kind.train_list) and len(test) == 12 and spec.classes == (10 if name == "cifar10" else 100)
    x, y = test.batch(torch.arange(12))
    assert x.shape == (12, 3, 32, 32) and y.tolist() == [i % 10 for i in range(12)]
    expected = (torch.from_numpy(pixels).view(12, 3, 32, 32).float() / 255 - torch.tensor(SPECS[name].mean).view(3, 1, 1)) \
        / torch.tensor(SPECS[name].std).view(3, 1, 1)
    torch.testing.assert_close(x, expected)


def test_svhn_files_in_their_own_format_load(tmp_path, monkeypatch):
    """SVHN's .mat files (labels 1..10, 10 meaning the digit 0), generated here; checksums as above."""
    from scipy.io import savemat
    from torchvision import datasets

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (32, 32, 3, 10), dtype=torch.uint8, generator=gen).numpy()
    for split in ("train", "test"):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": pixels, "y": (torch.arange(10) + 1).view(10, 1).numpy()})
    monkeypatch.setattr(datasets.SVHN, "split_list", {split: [url, file, _md5(tmp_path / file)] for split, (url, file, _)
                                                      in datasets.SVHN.split_list.items() if split != "extra"})
    train, test, spec = load(DataConfig(name="svhn", root=str(tmp_path), download=False))
    x, y = train.batch(torch.arange(10))
    assert x.shape == (10, 3, 32, 32) and spec.classes == 10
    assert y.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    first = torch.from_numpy(pixels[:, :, :, 0]).permute(2, 0, 1).float() / 255  # H x W x C to C x H x W
    torch.testing.assert_close(x[0], (first - torch.tensor(SPECS["svhn"].mean).view(3, 1, 1))
                               / torch.tensor(SPECS["svhn"].std).view(3, 1, 1))


@pytest.mark.parametrize("damage, says", [
    (lambda root: (root / "train-images-idx3-ubyte.gz").write_bytes(
        (root / "train-images-idx3-ubyte.gz").read_bytes()[:-200]), "Compressed file ended"),
    (lambda root: _write_idx(root / "train-labels-idx1-ubyte", torch.tensor(3, dtype=torch.uint8), True),
     "() labels for the 40 images"),
    (lambda root: _write_idx(root / "t10k-labels-idx1-ubyte", torch.full((20,), 10, dtype=torch.uint8), True),
     "a label 10, outside the set's classes 0..9"),
    (lambda root: _write_idx(root / "t10k-labels-idx1-ubyte", torch.zeros(19, dtype=torch.uint8), True),
     "(19,) labels for the 20 images"),
    (lambda root: _write_idx(root / "train-images-idx3-ubyte", torch.zeros(40, 5, 5, dtype=torch.uint8), True),
     "images of shape (5, 5), expected (28, 28)"),
], ids=["truncated gzip", "no dimension", "label out of range", "a label short", "5x5 images"])
def test_idx_files_that_do_not_fit_the_set_are_one_line(tmp_path, damage, says):
    _fake_idx_set(tmp_path, MNIST_FILES, 10, compress=True)
    damage(tmp_path)
    with pytest.raises(ConfigError, match="not valid IDX files") as refused:
        load(DataConfig(root=str(tmp_path), download=False))
    assert says in str(refused.value) and "\n" not in str(refused.value), refused.value
