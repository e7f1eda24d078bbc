"""No file the trainer reads decides what code runs or where it writes: a checkpoint or a model.pt
naming an import path runs it only when the person running the command names it too, names in a
checkpoint's manifest stay inside its folder, and an edge writes its parts where its own config says."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from split_trainer.config import ConfigError, load_config
from split_trainer.model.model_file import save_model
from split_trainer.model.models import check_named, given_name
from split_trainer.records import checkpoint
from split_trainer.training.hosting import EdgeHost

from conftest import quick_overrides

NAME = "trust_net:net"
MODULE = '''
from collections import OrderedDict
from pathlib import Path

from torch import nn

Path(__file__).with_name("imported").touch()  # importing this module is running code: it leaves a mark


def net(marker: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    Path(marker).touch()  # so does calling it
    side = (image_size - 3) // 2 + 1
    return nn.Sequential(OrderedDict([("conv", nn.Conv2d(in_channels, 4, 3, 2)), ("flatten", nn.Flatten()),
                                      ("fc", nn.Linear(4 * side * side, num_classes))]))
'''
# The smallest audit: the refusal must come before any of it, and consent must reach its end.
AUDIT = ["--decoders", "small", "--public", "8", "--private", "8", "--reidentify", "2", "--candidates", "2", "--decoder-epochs", "1",
         "--inversions", "1", "--inversion-steps", "1", "--unsplit", "1", "--unsplit-rounds", "1", "--hijack-steps", "0"]


@pytest.fixture
def trained(in_process, mnist_root, tmp_path, monkeypatch):
    """A two-step loopback run of the test's own network (``trust_net:net`` in tmp_path, on
    sys.path as PYTHONPATH would put it): its run folder, every mark of the training's own import
    and call removed, and the module forgotten, so that importing it again would run it again."""
    (tmp_path / "trust_net.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "trust_net", raising=False)

    def train(*keys: str) -> Path:
        run_dir = tmp_path / "run"
        code, out, err = in_process(*quick_overrides(mnist_root, run_dir, 1, **{
            "topology.transport": "loopback", "model.name": NAME, "model.args.marker": tmp_path / "called",
            "model.split": "conv", "train.max_steps": 2, "data.limit_train": 256, "data.limit_test": 64}), *keys)
        assert code == 0, (out + err)[-3000:]
        forget(tmp_path)
        return run_dir

    yield train
    forget(tmp_path)


def forget(folder: Path) -> None:
    sys.modules.pop("trust_net", None)
    for mark in ("imported", "called", "system"):
        (folder / mark).unlink(missing_ok=True)


def nothing_ran(folder: Path) -> bool:
    return "trust_net" not in sys.modules and not any((folder / mark).exists() for mark in ("imported", "called",
                                                                                              "system"))


def refusal(code: int, out: str, err: str) -> str:
    lines = (out + err).strip().splitlines()
    assert code == 2 and len(lines) == 1, out + err
    return lines[0]


def rewrite_manifest(step: Path, change) -> None:
    """What whoever shares a checkpoint can do: the manifest is theirs to write."""
    manifest = json.loads((step / checkpoint.MANIFEST).read_text())
    change(manifest)
    (step / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def os_system(folder: Path) -> dict:
    """A model config whose import path runs a shell command, harmless but for the file it leaves."""
    return {"name": "os:system", "args": {"command": f"touch {folder / 'system'}"}, "split": "conv", "plan": None,
            "dropout": True}


def test_a_checkpoint_naming_an_import_path_runs_nothing_unless_you_name_it(trained, in_process, mnist_root,
                                                                              tmp_path):
    run_dir = trained()
    checkpoints, out = run_dir / "checkpoints", tmp_path / "exported.pt"
    data = ["--set", f"data.root={mnist_root}"]
    commands = {"evaluate": ["evaluate", "--checkpoint", str(checkpoints), *data],
                "export": ["export", "--checkpoint", str(checkpoints), "--out", str(out)],
                "audit": ["audit", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "audit"), *AUDIT, *data]}
    for command, argv in commands.items():
        line = refusal(*in_process(*argv))
        assert f"names model.name={NAME}, an import path" in line and f"pass --set model.name={NAME}" in line, line
        assert nothing_ran(tmp_path), command
    assert not out.exists() and not (tmp_path / "audit").exists()
    step = checkpoint.find_resumable(checkpoints, warn=pytest.fail).path
    rewrite_manifest(step, lambda m: m["config"].update(model=os_system(tmp_path)))
    for command, argv in commands.items():
        assert "pass --set model.name=os:system" in refusal(*in_process(*argv)), command
        assert nothing_ran(tmp_path), command


def test_a_model_file_naming_an_import_path_runs_nothing_unless_you_name_it(trained, in_process, mnist_root,
                                                                              tmp_path):
    model_pt, out = trained() / "model.pt", tmp_path / "exported.pt"
    for command in (["evaluate", "--set", f"data.root={mnist_root}"], ["export", "--out", str(out)]):
        line = refusal(*in_process(*command, "--checkpoint", str(model_pt)))
        assert f"{model_pt} names model.name={NAME}" in line and f"pass --set model.name={NAME}" in line, line
        assert nothing_ran(tmp_path) and not out.exists()
    saved = torch.load(model_pt, weights_only=True)
    save_model(model_pt, os_system(tmp_path), saved["shape"], saved["state_dict"])
    for command in (["evaluate", "--set", f"data.root={mnist_root}"], ["export", "--out", str(out)]):
        assert "pass --set model.name=os:system" in refusal(*in_process(*command, "--checkpoint", str(model_pt)))
        assert nothing_ran(tmp_path) and not out.exists()
    # Another path named by the user is no consent to the file's: its own is still refused.
    line = refusal(*in_process("export", "--checkpoint", str(model_pt), "--out", str(out), "--set",
                               f"model.name={NAME}"))
    assert "names model.name=os:system" in line and nothing_ran(tmp_path)


def test_naming_the_path_yourself_runs_it(trained, in_process, mnist_root, tmp_path):
    run_dir = trained()
    allow, data = ["--set", f"model.name={NAME}"], ["--set", f"data.root={mnist_root}", "data.limit_test=64"]
    for target in (run_dir / "checkpoints", run_dir / "model.pt"):
        code, out, err = in_process("evaluate", "--checkpoint", str(target), *data, *allow)
        assert code == 0 and out.startswith("test_loss "), out + err
        assert (tmp_path / "called").exists()
        forget(tmp_path)
        code, out, err = in_process("export", "--checkpoint", str(target), "--out", str(tmp_path / "exported.pt"),
                                    *allow)
        assert code == 0 and f"({NAME}, " in out, out + err
        assert torch.load(tmp_path / "exported.pt", weights_only=True)["name"] == NAME
        forget(tmp_path)
    code, out, err = in_process("audit", "--checkpoint", str(run_dir / "checkpoints"), "--out",
                                str(tmp_path / "audit"), *AUDIT, *data, *allow)
    assert code == 0 and (tmp_path / "audit" / "audit.json").is_file(), (out + err)[-3000:]
    assert (tmp_path / "called").exists()


def test_resuming_takes_the_network_from_your_config_not_from_the_checkpoint(trained, tmp_path):
    """--resume reads weights from a checkpoint, never its config: a manifest naming os:system is
    resumed with the network the command line names, and nothing else runs."""
    run_dir = trained()
    step = checkpoint.find_resumable(run_dir / "checkpoints", warn=pytest.fail).path
    rewrite_manifest(step, lambda m: m["config"].update(model=os_system(tmp_path)))
    trained("train.max_steps=4")  # the same run, two steps further: it resumes from step 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("event") == "resume"] == [2]
    assert not (tmp_path / "system").exists()


def test_names_registered_or_given_by_you_pass_and_only_yours_count():
    check_named("mnist_cnn", None, "model.pt")  # a registered architecture runs no code of the file's choosing
    check_named(NAME, NAME, "model.pt")
    assert given_name(["data.root=x", f"model.name={NAME}", "train.lr=0.1"]) == NAME
    assert given_name(["model.name=a:b", "model.name=c:d"]) == "c:d"  # the last one wins, as in the config
    with pytest.raises(ConfigError, match="pass --set model.name=os:system"):
        check_named("os:system", "c:d", "model.pt")


def _planted(tmp_path: Path, name: str) -> Path:
    """A checkpoint whose manifest names ``name`` as a file, with the size and SHA-256 of a real,
    loadable part lying there: only the check of the name stands between it and being read."""
    checkpoint.save(tmp_path / "checkpoints", 10, {"central": {"w": torch.ones(3)}}, {}, keep=3)
    step = tmp_path / "checkpoints" / "step_00000010"
    target = Path(name) if name.startswith("/") else step / name
    if not name.startswith("/"):
        target.parent.mkdir(parents=True, exist_ok=True)
        (step / "central.pt").rename(target)
    data = target.read_bytes()
    rewrite_manifest(step, lambda m: m.update(files={name: {"bytes": len(data),
                                                            "sha256": hashlib.sha256(data).hexdigest()}}))
    return step


@pytest.mark.parametrize("name", ["../x.pt", "../../x.pt", "/etc/passwd", "sub/central.pt", "central"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_unread(tmp_path, in_process, name):
    step = _planted(tmp_path, name)
    with pytest.raises(ValueError, match=f"names the file '{name}', which is no plain NAME.pt name"):
        checkpoint.load(step)
    warnings = []
    assert checkpoint.find_resumable(step.parent, warn=warnings.append) is None and len(warnings) == 1
    line = refusal(*in_process("evaluate", "--checkpoint", str(step)))
    assert f"names the file '{name}'" in line and "refused, nothing read" in line


def test_a_part_that_is_a_link_out_of_the_folder_is_refused(tmp_path):
    checkpoint.save(tmp_path, 10, {"central": {"w": torch.ones(3)}}, {}, keep=3)
    part = tmp_path / "step_00000010" / "central.pt"
    part.rename(tmp_path / "elsewhere.pt")  # same bytes, same hash: only the link is wrong
    part.symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(ValueError, match="not a regular file"):
        checkpoint.load(tmp_path / "step_00000010")


@pytest.mark.parametrize("name", ["../../evil", "/tmp/evil", "edge1/../../evil", "central", "edge01"])
def test_a_manifest_naming_an_edge_part_that_is_no_edge_is_refused(tmp_path, in_process, name):
    checkpoint.save(tmp_path / "checkpoints", 10, {"central": {"w": torch.ones(3)}}, {}, keep=3)
    step = tmp_path / "checkpoints" / "step_00000010"
    rewrite_manifest(step, lambda m: m.update(edge_parts={name: {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(ValueError, match=f"names the edge part '{name}', which is no plain edgeK name"):
        checkpoint.load(step)
    line = refusal(*in_process("export", "--checkpoint", str(step), "--out", str(tmp_path / "out.pt")))
    assert f"names the edge part '{name}'" in line and not (tmp_path / "out.pt").exists()


def test_an_edge_writes_its_parts_where_its_own_config_says(tmp_path):
    """On RPC the central's config reaches the edge; where the edge writes and prunes its parts on
    its own disk, and how many it keeps (its own checkpoint.keep, plus one), comes from the edge
    process's own config (training.hosting.EdgeHost)."""
    central = load_config(None, ["privacy.edge_weights=edges", f"checkpoint.dir={tmp_path / 'central_says'}",
                                 "checkpoint.keep=5"])
    own = load_config(None, ["privacy.edge_weights=edges", f"output.run_dir={tmp_path / 'own'}", "checkpoint.keep=1"])
    elsewhere = tmp_path / "central_says" / "edges" / "edge1"
    checkpoint.save(elsewhere, 1, {"edge1": {"w": torch.ones(1)}}, {}, keep=1)  # what the edge must not prune
    (elsewhere / ".step_00000002.tmp-1").mkdir()  # nor clean up
    before = sorted(elsewhere.rglob("*"))
    edge = EdgeHost(own, [1]).build("edge1", central, peers=lambda name: None, autograd=None)
    written = [edge.save_part(step, "job") for step in (2, 3, 4)]
    folder = tmp_path / "own" / "checkpoints" / "edges" / "edge1"
    assert [p.name for p in checkpoint.complete_candidates(folder)] == ["step_00000004", "step_00000003"]
    assert sorted(elsewhere.rglob("*")) == before
    edge.load_part(4, written[-1])  # and it resumes from its own disk
