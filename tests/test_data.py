import gzip
import shutil

import pytest
import torch

from split_trainer.config import ConfigError, DataConfig
from split_trainer.data import FILES, epoch_order, load_mnist


def test_real_mnist_from_gzip_files(mnist_root):
    train, test = load_mnist(DataConfig(root=str(mnist_root)))
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(train.images.mean().item()) < 0.01  # normalised with the MNIST mean and std


def test_torchvision_raw_layout(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        with gzip.open(mnist_root / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    train, test = load_mnist(DataConfig(root=str(tmp_path), limit_train=100, limit_test=10))
    assert len(train) == 100 and len(test) == 10


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ConfigError, match="lacks MNIST file"):
        load_mnist(DataConfig(root=str(tmp_path)))
    for name in FILES:
        (tmp_path / name).write_bytes(b"not idx")
    with pytest.raises(ConfigError, match="not valid IDX files"):
        load_mnist(DataConfig(root=str(tmp_path)))


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = epoch_order(1000, 64, 1, 0), epoch_order(1000, 64, 1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], epoch_order(1000, 64, 1, 1)[0])
    assert sorted(torch.cat(a).tolist()) == list(range(1000)) and len(a[-1]) == 1000 - 15 * 64
