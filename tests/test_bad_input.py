"""Every bad input is one line and exit 2, never a traceback, and leaves nothing half-written:
property-based (hypothesis) over what a user or a peer hands the trainer: configs and overrides,
csv tables, IDX files, checkpoint manifests and model files. Each property holds for random input
and for damaged real input alike: the reader returns, or it raises ConfigError (ValueError where
the module's contract says so) with one line."""

import gzip
import io
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from split_trainer.config import ConfigError, load_config
from split_trainer.config.whole import Config
from split_trainer.data.datasets import MNIST_FILES, load
from split_trainer.data.vertical import read_csv
from split_trainer.config import DataConfig
from split_trainer.model.model_file import read_model, save_model
from split_trainer.records import checkpoint

# derandomize: the same examples in every run, so that CI and a developer see the same result
SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KEYS = [f"{section}.{name}" for section, fields in Config().to_dict().items() for name in fields]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def folder() -> Path:
    """A fresh folder for one example (hypothesis runs many in one test's tmp_path)."""
    return Path(tempfile.mkdtemp(prefix="bad-input-"))


@settings(max_examples=80, **SETTINGS)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS + ["train", "nope.x", ""]), st.text(max_size=10)),
    max_size=3))
def test_a_config_and_overrides_load_or_are_one_line(keys, overrides):
    raw: dict = {}
    for key, value in keys.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    where = folder()
    try:
        path = where / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            assert isinstance(load_config(path, overrides), Config)
        except ConfigError as exc:
            one_line(exc)
    finally:
        shutil.rmtree(where)


@settings(max_examples=100, **SETTINGS)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_a_config_file_load_or_are_one_line(data):
    where = folder()
    try:
        (where / "c.yaml").write_bytes(data)
        try:
            load_config(where / "c.yaml")
        except ConfigError as exc:
            one_line(exc)
    finally:
        shutil.rmtree(where)


cells = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                  st.text(max_size=6), st.sampled_from(["nan", "inf", "-inf", "1e39", "", "1_0", "0x10"]))


@settings(max_examples=150, **SETTINGS)
@given(st.lists(st.lists(cells, min_size=1, max_size=4), max_size=6),
       st.sampled_from([["id", "a"], ["id", "a", "b"], ["x", "a"], ["id"]]))
def test_a_csv_table_reads_or_is_one_line_naming_its_file(rows, header):
    where = folder()
    try:
        path = where / "train.csv"
        path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
        try:
            ids, names, table = read_csv(path)
            assert table.shape == (len(ids), len(names) - 1) and torch.isfinite(table).all()
        except ConfigError as exc:
            assert str(path) in one_line(exc)
    finally:
        shutil.rmtree(where)


def _idx(array: torch.Tensor) -> bytes:
    return bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">i", d) for d in array.shape) + \
        array.numpy().tobytes()


@settings(max_examples=60, **SETTINGS)
@given(st.integers(0, 3), st.one_of(
    st.binary(max_size=64).map(lambda b: ("replace", b)),
    st.tuples(st.integers(0, 200), st.integers(0, 255)).map(lambda c: ("flip", c)),
    st.integers(0, 200).map(lambda n: ("cut", n)),
    st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4).map(lambda d: ("dims", d))), st.booleans())
def test_an_idx_set_with_a_damaged_file_loads_or_is_one_line(which, damage, compress):
    where = folder()
    try:
        images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(8, dtype=torch.uint8)
        files = [_idx(a) for a in (images, labels, images[:4], labels[:4])]
        kind, arg = damage
        data = bytearray(files[which])
        if kind == "replace":
            data = bytearray(arg)
        elif kind == "flip" and arg[0] < len(data):
            data[arg[0]] = arg[1]
        elif kind == "cut":
            data = data[:arg]
        elif kind == "dims":
            header = bytearray([0, 0, 0x08, len(arg)]) + b"".join(struct.pack(">I", d) for d in arg)
            data = header + data[4 + 4 * data[3]:]
        files[which] = bytes(data)
        for name, blob in zip(MNIST_FILES, files):
            (where / (name + (".gz" if compress else ""))).write_bytes(gzip.compress(blob) if compress else blob)
        try:
            train, test, _ = load(DataConfig(root=str(where), download=False))
            assert len(train) == 8 and len(test) == 4
        except ConfigError as exc:
            one_line(exc)
    finally:
        shutil.rmtree(where)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A small, real checkpoint folder to damage: one central part, one edge part."""
    directory = tmp_path_factory.mktemp("real_checkpoint")
    path, _ = checkpoint.save(directory, 8, {"central": {"module": {"w": torch.ones(3)}},
                                                  "edge1": {"module": {"w": torch.zeros(2)}}},
                              {"job": "000001-abc", "config": {"model": {"name": "mnist_cnn"}}}, keep=2)
    return path


manifest_values = st.one_of(values, st.integers(), st.just({}), st.just([]),
                            st.dictionaries(st.sampled_from(["central.pt", "edge1.pt", "../x.pt", "edge1"]),
                                            st.dictionaries(st.sampled_from(["bytes", "sha256"]), values, max_size=2),
                                            max_size=3))


@settings(max_examples=80, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["step", "files", "job", "written_at", "edge_parts", "config", "shape",
                                        "fingerprint"]), manifest_values, max_size=4),
       st.booleans())
def test_a_damaged_manifest_is_skipped_or_refused_in_one_line(real_checkpoint, in_process, changes, drop):
    where = folder()
    try:
        step = where / real_checkpoint.name
        shutil.copytree(real_checkpoint, step)
        manifest = json.loads((step / checkpoint.MANIFEST).read_text())
        manifest.update(changes)
        if drop and changes:
            manifest.pop(next(iter(changes)))
        (step / checkpoint.MANIFEST).write_text(json.dumps(manifest))
        found = checkpoint.complete_candidates(where, warn=lambda text: one_line(ValueError(text)))
        assert found in ([], [step])
        try:
            checkpoint.load(step)
        except ValueError as exc:
            one_line(exc)
        out = where / "model.pt"
        code, stdout, err = in_process("export", "--checkpoint", str(step), "--out", str(out))
        assert code == 2 and not out.exists() and len(err.strip().splitlines()) == 1, err
        assert not list(where.glob(".*tmp*"))
    finally:
        shutil.rmtree(where)


@settings(max_examples=100, **SETTINGS)
@given(st.fixed_dictionaries({}, optional={"name": values, "model": values, "shape": values,
                                          "state_dict": st.one_of(values, st.dictionaries(
                                              st.text(max_size=8), st.builds(torch.zeros, st.integers(0, 3)),
                                              max_size=3))}))
def test_a_model_file_of_any_content_is_read_or_one_line_and_writes_nothing(in_process, saved):
    where = folder()
    try:
        path, out = where / "model.pt", where / "out.pt"
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        path.write_bytes(buffer.getvalue())
        try:
            read_model(path)
        except ConfigError as exc:
            one_line(exc)
        code, stdout, err = in_process("export", "--checkpoint", str(path), "--out", str(out))
        assert code in (0, 2), err
        assert code == 0 or (not out.exists() and len(err.strip().splitlines()) == 1), err
    finally:
        shutil.rmtree(where)


def test_a_real_model_file_cut_or_flipped_anywhere_is_one_line(in_process, tmp_path):
    """The file save_model writes, cut at every 97th byte and with every 97th byte flipped."""
    from split_trainer.model.model_file import build_model  # noqa: F401  (the export path builds it)
    from split_trainer.model.plan import build_plan
    from split_trainer.config import ModelConfig

    shape = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    model = build_plan(ModelConfig(name="mlp", split="relu1"), shape, seed=0).full
    good = tmp_path / "good.pt"
    save_model(good, {"name": "mlp", "split": "relu1"}, shape, model.state_dict())
    data = good.read_bytes()
    for at in range(0, len(data), max(1, len(data) // 40)):
        for damaged in (data[:at], data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]):
            path, out = tmp_path / "m.pt", tmp_path / "out.pt"
            path.write_bytes(damaged)
            code, stdout, err = in_process("export", "--checkpoint", str(path), "--out", str(out))
            assert code in (0, 2) and (code == 0 or not out.exists()), err
            assert code == 0 or len(err.strip().splitlines()) == 1, err
            out.unlink(missing_ok=True)


def test_a_checkpoint_of_parts_that_are_no_module_states_is_one_line(in_process, tmp_path):
    """A checkpoint whose hashes hold, written with parts of another shape: no part but the central's,
    or a part that is no mapping of tensors."""
    config = {"model": {"name": "mnist_cnn"}}
    shape = {"in_channels": 1, "image_size": 28, "num_classes": 10}
    for case, parts in {"central only": {"central": {"module": {"w": torch.ones(1)}}},
                        "no mapping": {"central": {"module": {"w": torch.ones(1)}}, "edge1": [1, 2]},
                        "no tensors": {"central": {"module": {"w": "text"}}, "edge1": {"module": {}}}}.items():
        path, _ = checkpoint.save(tmp_path / case.replace(" ", "_"), 1, parts, {"config": config, "shape": shape},
                                  keep=1)
        out = tmp_path / "out.pt"
        code, stdout, err = in_process("export", "--checkpoint", str(path), "--out", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "not a checkpoint this trainer wrote" in err, \
            (case, err)
        assert not out.exists()
