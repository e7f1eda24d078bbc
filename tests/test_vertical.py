"""data.placement: vertical: parties that hold different features of the same records, aligned by
private set intersection, merged at the central (docs/vertical.md)."""

import csv
import json
import random

import pytest
import torch
import torch.nn.functional as F

from split_trainer.config import load_config
from split_trainer.data import alignment
from split_trainer.data.batches import epoch_order
from split_trainer.data.datasets import load
from split_trainer.data.vertical import kept, party_inputs, regions
from split_trainer.model.vertical import merge, vertical_plan
from split_trainer.records import checkpoint

from conftest import THREADS, child_env, quick_overrides, run, torchrun_cmd

# 1,024 records: each run aligns every party's ids by PSI (elliptic-curve work per id) before it trains
VERTICAL = {"data.placement": "vertical", "data.missing": 0.05, "data.limit_train": 1024}
EXACT = {"train.threads": THREADS, **VERTICAL, "train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05,
         "model.dropout": "false",
         "train.max_steps": 12, "train.seed": 5}


def shared_rows(cfg, n: int, split: str = "train") -> list[int]:
    """The records every party's copy holds, in the agreed order (sorted ids), from the seed alone."""
    offset = 0 if split == "train" else 1
    held = set.intersection(*(set(kept(n, cfg.data.missing, cfg.train.seed + offset, k).tolist())
                              for k in range(1, cfg.topology.edges + 1)))
    return [int(pid.split(":")[1]) for pid in sorted(f"{split}:{i}" for i in held)]


def reference(cfg, steps: int) -> tuple[list[dict], dict]:
    """Vertical training written out in one process: every party's segment on its region of the
    same records, merged, the central's segment and the loss, one SGD step of everything."""
    train, _, _ = load(cfg.data)
    rows = torch.tensor(shared_rows(cfg, len(train)))
    bottoms = [vertical_plan(cfg, cfg.train.seed, (k, party_inputs(cfg, k))).segments[0].module
               for k in range(1, cfg.topology.edges + 1)]
    top = vertical_plan(cfg, cfg.train.seed).segments[1].module
    params = [p for m in (*bottoms, top) for p in m.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr)
    for idx in epoch_order(len(rows), cfg.data.batch_size, cfg.train.seed, 0)[:steps]:
        x, y = train.batch(rows[idx])
        parts = [bottom(x[:, :, r, c]) for bottom, (r, c) in zip(bottoms, regions(cfg))]
        loss = F.cross_entropy(top(merge(parts, cfg.model.merge)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [b.state_dict() for b in bottoms], top.state_dict()


@pytest.mark.parametrize("edges, engine, how", [(2, "relay", "concat"), (2, "autograd", "mean"),
                                                pytest.param(4, "relay", "sum", marks=pytest.mark.slow)])
def test_vertical_training_equals_its_single_process_reference(loopback, tmp_path, edges, engine, how):
    """No dropout, plain SGD: every party's segment and the central's equal the reference on the
    same shared records, for each merge and both engines (so each party got its own part's gradient)."""
    regions_ = "quadrants" if edges == 4 else "bands"
    loopback(tmp_path, edges, **EXACT, **{"train.engine": engine, "model.merge": how, "data.regions": regions_})
    cfg = load_config(tmp_path / "config.yaml")
    bottoms, top = reference(cfg, 12)
    parts = checkpoint.load(checkpoint.directory(cfg) / "step_00000012").parts
    for expected, got in [*((b, parts[f"edge{k}"]["module"]) for k, b in enumerate(bottoms, 1)),
                          (top, parts["central"]["module"])]:
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)


def test_no_feature_and_no_id_outside_the_intersection_crosses(loopback, tmp_path, mnist_root):
    """3 parties in bands of 9, 10 and 9 rows, int8: each party sends exactly its activation's bytes
    and receives exactly its gradient's, and no input or label crosses either way; at alignment
    each party receives the PSI request and the shared ids, nothing more, and the central receives
    only the parties' encrypted answers."""
    steps = 20
    summary = loopback(tmp_path, 3, **{**VERTICAL, "rpc.activation_dtype": "int8", "train.max_steps": steps,
                                       "data.limit_train": 2048})  # 20 whole batches in one epoch
    cfg = load_config(tmp_path / "config.yaml")
    widths = {"edge1": 64 * 2 * 12, "edge2": 64 * 3 * 12, "edge3": 64 * 2 * 12}  # pool of (rows - 4) // 2 x 12
    train, test, _ = load(cfg.data)
    shared = sorted([f"train:{i}" for i in shared_rows(cfg, len(train))] +
                    [f"test:{i}" for i in shared_rows(cfg, len(test), "test")])
    request = alignment.Client([str(i) for i in range(len(train) + len(test))]).request
    for name, traffic in summary["bytes"]["per_edge"].items():
        assert traffic["received"]["activations"] == traffic["sent"]["activation_grads"] == steps * 64 * (
            widths[name] + 4), name
        for way in ("sent", "received"):
            assert traffic[way]["inputs"] == traffic[way]["labels"] == 0, (name, way)
        assert traffic["sent"]["alignment"] == len(request) + len(alignment.encode_ids(shared)), name
    alignment_file = json.loads((tmp_path / "alignment.json").read_text())["records"]
    assert alignment_file["shared"] == {"train": len(shared_rows(cfg, len(train))),
                                        "test": len(shared_rows(cfg, len(test), "test"))}
    for k in (1, 2, 3):
        assert alignment_file[f"edge{k}"]["train"] == len(train) - round(0.05 * len(train))


def test_the_psi_answers_hold_no_id_in_the_clear_and_find_the_intersection():
    ids = [f"train:record-{i:04d}" for i in range(300)]
    client = alignment.Client(ids)
    held = [ids[i] for i in range(300) if i % 3], [ids[i] for i in range(0, 300) if i % 5] + ["train:elsewhere"]
    answers = [alignment.answer(party, client.request, len(ids)) for party in held]
    for setup, response in answers:
        for blob in (setup, response, client.request):
            assert b"record-" not in alignment.as_bytes(blob) and b"elsewhere" not in alignment.as_bytes(blob)
    assert alignment.intersect(client, answers) == sorted(set(held[0]) & set(held[1]))


class _Table:
    """A party's split of records, held in memory."""

    def __init__(self, ids):
        self.ids = ids

    def rows(self, idx):
        return torch.zeros(len(idx), 2)


def test_a_party_answers_one_bounded_psi_request_and_takes_the_shared_records_once():
    """A label party that pads its set with guesses (5,000 for a party of 100 records found all of
    them) is refused; an honest one is answered once; the list of shared records is taken once,
    after the answer, and refused whole, unnamed, if it holds a record the party lacks."""
    from split_trainer.core.errors import EdgeRefusal
    from split_trainer.data.vertical import PartyData

    cfg = load_config(None, ["data.placement=vertical", "topology.edges=2"])
    mine = {"train": [f"r{i}" for i in range(80)], "test": [f"t{i}" for i in range(20)]}

    def party():
        return PartyData(1, {split: _Table(ids) for split, ids in mine.items()}, cfg)

    guesses = alignment.Client([f"train:r{i}" for i in range(5000)])
    with pytest.raises(EdgeRefusal, match=r"^party edge1 refuses an alignment request of 5,000 ids: it answers at most "
                                      r"data.psi_max_ratio=2 x the 100 it holds \(200\)$"):
        party().psi_answer(guesses.request, 5000)
    honest = alignment.Client([f"train:r{i}" for i in range(90)] + [f"test:t{i}" for i in range(20)])
    with pytest.raises(EdgeRefusal, match="claims 20"):
        party().psi_answer(honest.request, 20)
    answering = party()
    with pytest.raises(EdgeRefusal, match="once per run, after its own PSI answer"):
        answering.align(alignment.encode_ids(["train:r1"]))
    shared = alignment.intersect(honest, [answering.psi_answer(honest.request, 110)])
    assert len(shared) == 100
    with pytest.raises(EdgeRefusal, match="answers one alignment request per run"):
        answering.psi_answer(honest.request, 110)
    with pytest.raises(RuntimeError, match="^party 1 was asked to train on a record it does not hold: align again"):
        answering.align(alignment.encode_ids(shared + ["train:r85"]))
    with pytest.raises(EdgeRefusal, match="once per run"):  # and no second try with another list
        answering.align(alignment.encode_ids(shared))


def _tables(root, seed: int = 0):
    """Two parties' tables and the labels: the class is whether a (edge1) + b (edge2) > 0, so that
    neither party's features alone predict it well. Each file lacks some records."""
    rng = random.Random(seed)
    files = {"edge1": ["id", "a", "noise1", "noise2"], "edge2": ["id", "b", "noise3"], "labels": ["id", "label"]}
    lacks = {"edge1": set(range(0, 30)), "edge2": set(range(20, 60)), "labels": set(range(590, 600))}
    for split, n in (("train", 600), ("test", 200)):
        rows = {name: [] for name in files}
        for i in rng.sample(range(n), n):  # files in no particular order
            a, b = rng.gauss(0, 1), rng.gauss(0, 1)
            values = {"edge1": [a, rng.gauss(0, 1), rng.gauss(0, 1)], "edge2": [3 * b, rng.gauss(0, 1)],
                      "labels": [int(a + b > 0)]}
            for name in files:
                if split == "test" or i not in lacks[name]:
                    rows[name].append([f"r{i}", *values[name]])
        for name, header in files.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            with open(root / name / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([header, *rows[name]])
    return {"train": 600 - len(lacks["edge1"] | lacks["edge2"] | lacks["labels"]), "test": 200}


def test_a_csv_fleet_aligns_its_tables_and_learns_from_both_parties(in_process, tmp_path):
    shared = _tables(tmp_path / "tables")
    code, out, err = in_process("--set", "topology.transport=loopback", "topology.edges=2", "data.name=csv",
                                "data.placement=vertical", f"data.root={tmp_path / 'tables'}", "data.num_classes=2",
                                "data.batch_size=32", "data.eval_batch_size=100", "model.name=mlp", "model.split=relu1",
                                "train.epochs=12", "train.lr=0.1", "train.lr_gamma=1.0", f"output.run_dir={tmp_path}",
                                "logging.every_steps=50")
    assert code == 0, (out + err)[-3000:]
    records = json.loads((tmp_path / "alignment.json").read_text())["records"]
    assert records == {"label_party": {"train": 590, "test": 200}, "edge1": {"train": 570, "test": 200},
                       "edge2": {"train": 560, "test": 200}, "shared": shared}
    assert "edge1 570 train / 200 test, features 3; edge2 560 train / 200 test, features 2" in out
    assert f"): {shared['train']} train / 200 test records" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.9, summary  # either party alone: about 0.75


@pytest.mark.parametrize("damage, says", [
    (lambda root: (root / "edge2" / "test.csv").unlink(), "cannot read"),
    (lambda root: (root / "edge1" / "train.csv").write_text("id,a\nr1,0.5\nr2,high\n"), "train.csv line 3: a value"),
    (lambda root: (root / "labels" / "train.csv").write_text("id,label\nr1,0\nr1,1\n"), "an id appears twice"),
    (lambda root: (root / "labels" / "test.csv").write_text("id,label\nr1,0\nr2,2\n"), "labels must be whole"),
    (lambda root: (root / "edge1" / "train.csv").write_text("id,a\nr1,0.5\nr2,nan\n"), "train.csv line 3: nan is no"),
    (lambda root: (root / "edge2" / "train.csv").write_text("id,b\nr1,1e39\nr2,1\n"), "train.csv line 2: 1e+39 is no"),
    (lambda root: (root / "edge1" / "test.csv").write_bytes(b"id,a\n\x00\xff\xfe,1\n"), "not a CSV file of text"),
], ids=["missing", "not a number", "id twice", "label out of range", "nan", "overflows float32", "binary"])
def test_a_bad_table_is_one_line_before_anything_is_written(in_process, tmp_path, damage, says):
    _tables(tmp_path / "tables")
    damage(tmp_path / "tables")
    code, out, err = in_process("--set", "topology.transport=loopback", "topology.edges=2", "data.name=csv",
                                "data.placement=vertical", f"data.root={tmp_path / 'tables'}", "data.num_classes=2",
                                "model.name=mlp", "model.split=relu1", f"output.run_dir={tmp_path / 'run'}")
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three runs and an audit: the fast tier's longest
def test_a_vertical_run_resumes_exactly_and_its_checkpoint_is_audited_per_party(loopback, in_process, mnist_root,
                                                                                 tmp_path):
    """Stopped at a checkpoint and resumed, each party's part on its own disk: the untouched run's
    test loss. evaluate and export refuse the checkpoint (one first segment per party), and the
    audit attacks each party on its own region."""
    keys = {**VERTICAL, "checkpoint.every_steps": 6, "privacy.edge_weights": "edges"}
    untouched = loopback(tmp_path / "a", 2, **keys, **{"train.max_steps": 16})
    loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 8})
    resumed = loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 16})
    assert resumed["resumed_from_step"] == 8
    assert abs(resumed["test_loss"] - untouched["test_loss"]) < 1e-6

    checkpoints = tmp_path / "a" / "checkpoints"
    for command in (["evaluate"], ["export", "--out", str(tmp_path / "m.pt")]):
        code, out, err = in_process(*command, "--checkpoint", str(checkpoints))
        assert code == 2 and "is a vertical run's" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.pt").exists()
    small = ["--public", "200", "--private", "100", "--reidentify", "20", "--candidates", "10", "--decoders", "small",
             "--decoder-epochs", "1", "--inversions", "2", "--inversion-steps", "3", "--unsplit", "2",
             "--unsplit-rounds", "1"]
    code, out, err = in_process("audit", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "audit"), *small,
                                "--set", f"data.root={mnist_root}")
    assert code == 0, (out + err)[-3000:]
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert list(report["cuts"]) == ["edge1 after pool", "edge2 after pool"]
    # with edge-held weights the attacks that need them say so: "decoder (given the edge weights)"
    assert all({"decoder", "inversion", "unsplit"} <= {name.split(" ")[0] for name in rows}
               for rows in report["cuts"].values())


@pytest.mark.parametrize("keys, says", [
    ({"data.regions": "quadrants"}, "data.regions=quadrants needs topology.edges=4"),
    ({"topology.min_edges": 1}, "data.placement=vertical needs every party"),
    ({"train.edge_loss": "local"}, "train.edge_loss=local is not supported with data.placement=vertical"),
    ({"topology.edges": 3, "model.merge": "sum"}, "model.merge=sum needs every party's activation of the same width"),
    ({"model.split": "relu1", "model.merge": "concat"}, "the central's segment must reach a linear layer"),
    ({"data.name": "csv", "data.placement": "edge", "data.num_classes": 2}, "data.name=csv needs data.placement=vertical"),
    ({"data.augment": "crop_flip"}, "data.augment=crop_flip is not supported with data.placement=vertical"),
], ids=["quadrants", "elastic", "local", "sum", "cut", "csv", "augment"])
def test_what_a_vertical_fleet_cannot_do_is_one_line_and_exit_2(in_process, tmp_path, mnist_root, keys, says):
    overrides = quick_overrides(mnist_root, tmp_path, 2, **{"data.placement": "vertical", **keys})
    code, out, err = in_process(*overrides)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.seconds(70)
def test_a_killed_party_resumes_to_the_untouched_runs_end(loopback, mnist_root, tmp_path):
    """torchrun, --max-restarts 2: edge2 is SIGKILLed at its 24th training call; the job resumes from
    its checkpoint and ends where the untouched run ends (the same run in one process: a loopback run
    is the RPC run, tests/test_loopback.py)."""
    # 1,024 records, 926 shared: 15 steps an epoch; flushes at 15, 16, 30 and 32. One training call a
    # batch and one more at each flush, so edge2's 24th call falls between steps 16 and 30.
    keys = {**VERTICAL, "train.max_steps": 32, "checkpoint.every_steps": 16,
            "rpc.activation_dtype": "int8", "train.threads": 1}  # one thread per rank: reductions follow it
    reference = loopback(tmp_path / "a", 2, **keys)
    killed = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path / "b", edges=2, **keys), max_restarts=2),
                 env=child_env(SPLIT_TRAINER_FAULT="edge2:train:24:kill"))
    assert killed.returncode == 0, killed.stdout[-4000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] == 16 and summary["steps"] == 32
    assert abs(summary["test_loss"] - reference["test_loss"]) < 1e-6
    cfgs = [load_config(tmp_path / d / "config.yaml") for d in ("a", "b")]
    a, b = (checkpoint.load(checkpoint.directory(c) / "step_00000032").parts for c in cfgs)
    for part in ("central", "edge1", "edge2"):
        for key in a[part]["module"]:
            torch.testing.assert_close(b[part]["module"][key], a[part]["module"][key], rtol=0, atol=1e-6, msg=key)
