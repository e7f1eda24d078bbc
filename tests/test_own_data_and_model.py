"""A folder of your images and a network from your own file, by config alone: whole runs of the
command line, the fleet in one process (loopback: the run torchrun's would be)."""

import json
import re
import sys

import pytest
import torch
from test_datasets import _png_folder

from conftest import ROOT, loopback_overrides


@pytest.mark.slow
def test_an_image_folder_trains_like_the_same_images_in_idx_files(in_process, mnist_root, tmp_path):
    """Real MNIST written as PNG files: the same samples, the same order, the same accuracy."""
    _png_folder(tmp_path / "pngs", mnist_root, 2048, 500)
    keys = {"train.epochs": 1, "data.limit_train": 2048, "data.limit_test": 500, "data.num_workers": 2}
    code, out, err = in_process(*loopback_overrides(mnist_root, tmp_path / "idx", 1, **keys))
    assert code == 0, (out + err)[-3000:]
    code, out, err = in_process(*loopback_overrides(tmp_path / "pngs", tmp_path / "folder", 1, **keys, **{
        "data.name": "image_folder", "data.channels": 1, "data.image_size": 28, "data.mean": "[0.1307]",
        "data.std": "[0.3081]"}))
    assert code == 0, (out + err)[-3000:]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("idx", "folder"))
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.005 and a["test_accuracy"] > 0.8
    assert "image_folder (1x28x28, 10 classes" in out


def _readme_example() -> str:
    """The own-model example file exactly as the README shows it."""
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n# my_models\.py\n(.*?)```", text, re.S).group(1)


def test_a_model_from_your_own_file_trains_and_exports(in_process, monkeypatch, mnist_root, tmp_path):
    (tmp_path / "my_models.py").write_text(_readme_example())
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH=tmp_path would
    monkeypatch.delitem(sys.modules, "my_models", raising=False)  # this test's file, not another's
    try:
        code, out, err = in_process(*loopback_overrides(mnist_root, tmp_path / "run", 2, **{
            "model.name": "my_models:small_cnn", "model.args.width": 8, "model.split": "pool",
            "train.max_steps": 20}))
        assert code == 0, (out + err)[-3000:]
        assert "my_models:small_cnn: edge conv..pool | central flatten..fc" in out
        exported, checkpoints = tmp_path / "exported.pt", str(tmp_path / "run" / "checkpoints")
        export = ["export", "--checkpoint", checkpoints, "--out", str(exported)]
        code, out, err = in_process(*export)  # the checkpoint's import path runs only when you name it (test_trust)
        assert code == 2 and "pass --set model.name=my_models:small_cnn" in err, out + err
        code, out, err = in_process(*export, "--set", "model.name=my_models:small_cnn")
        assert code == 0, out + err
    finally:
        sys.modules.pop("my_models", None)
    saved = torch.load(exported, weights_only=True)
    assert saved["model"]["args"] == {"width": 8} and saved["state_dict"]["conv.weight"].shape == (8, 1, 3, 3)


@pytest.mark.parametrize("name, words", [
    ("no_such_module:net", "cannot import no_such_module (ModuleNotFoundError"),
    ("my_models:missing", "module my_models has no function 'missing'"),
    ("my_models:not_a_sequence", "returned a Net, not an nn.Sequential: return nn.Sequential(OrderedDict("),
])
def test_a_bad_model_path_is_one_line_and_exit_2(in_process, monkeypatch, tmp_path, name, words):
    (tmp_path / "my_models.py").write_text(_readme_example() + "\n\nclass Net(nn.Module):\n    pass\n\n\n"
                                           "def not_a_sequence():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH=tmp_path would
    monkeypatch.delitem(sys.modules, "my_models", raising=False)  # this test's file, not another's
    try:
        code, out, err = in_process("--set", f"model.name={name}", f"output.run_dir={tmp_path}")
    finally:
        sys.modules.pop("my_models", None)
    assert code == 2
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out + err
