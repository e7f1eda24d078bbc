"""The whole trainer in one process (topology.transport=loopback): the same edge objects, links,
engines, dispatch, checkpoints and accounting as under torchrun, checked in seconds. The slow
test at the end checks that a loopback run is the RPC run."""

import json
from pathlib import Path

import pytest
import torch

from split_trainer.config import load_config
from split_trainer.core.batch import Batch
from split_trainer.core.errors import JobError
from split_trainer.data.datasets import load
from split_trainer.data.placement import edge_of
from split_trainer.data.shards import Shard
from split_trainer.training.central import Cadence
from split_trainer.training.dispatch import FirstCome, Queue, Rotation, Turns
from split_trainer.training.local import train_local

from conftest import THREADS, TUTORIAL_PLAN, quick_overrides, run, torchrun_cmd

PLANS = {"single cut": {"model.name": "mnist_cnn", "model.split": "pool"},
         "alternating": {"model.name": "tutorial_cnn", "model.plan": TUTORIAL_PLAN},
         "u-shaped": {"model.name": "mnist_cnn",
                      "model.plan": "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"}}
EXACT = {"train.threads": THREADS, "train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05,
         "model.dropout": "false",
         "train.max_steps": 12, "train.seed": 5}


def model_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("placement", ["central", "edge"])
@pytest.mark.parametrize("engine", ["relay", "autograd"])
@pytest.mark.parametrize("shape", PLANS)
def test_split_training_equals_local_training(loopback, tmp_path, shape, engine, placement):
    """1 edge, no dropout, plain SGD: the parameters equal single-process training on the same
    batches, every plan, both engines, both placements (the edge's own shard in edge placement)."""
    if shape == "u-shaped" and placement == "central":
        pytest.skip("a U-shaped plan keeps the labels on the edge: edge placement")
    summary = loopback(tmp_path, 1, **EXACT, **PLANS[shape], **{"train.engine": engine,
                                                                            "data.placement": placement})
    cfg = load_config(tmp_path / "config.yaml")
    train, test, _ = load(cfg.data)
    if placement == "edge":
        shard = Shard.carve(train, test, 1, 1, cfg.data, cfg.train.seed)
        local = train_local(cfg, shard.train, steps=12, order_seed=shard.seed).state_dict()
        for kind in ("inputs",) + (("labels",) if shape == "u-shaped" else ()):  # never reach the central
            traffic = summary["bytes"]["per_edge"]["edge1"]
            assert traffic["sent"][kind] == traffic["received"][kind] == 0, kind
        if shape == "u-shaped":  # what does cross the last cut: fc1's output, float32
            assert summary["bytes"]["per_cut"]["after dropout2"]["forward"] == 12 * 64 * 128 * 4
    else:
        local = train_local(cfg, train, steps=12).state_dict()
    initial = train_local(cfg, train, steps=0).state_dict()
    split = model_of(tmp_path)
    assert split.keys() == local.keys()
    for key in local:
        assert not torch.equal(local[key], initial[key])  # training moved every tensor
        torch.testing.assert_close(split[key], local[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("engine, dtype, in_flight", [("relay", "int8", 2), ("relay", "float16", 3),
                                                       ("autograd", "float8", 1), ("autograd", "bfloat16", 1)])
def test_wire_types_and_batches_in_flight_count_their_bytes_and_learn(loopback, tmp_path, engine, dtype, in_flight):
    """The alternating plan's three cuts in each wire type: what each cut carries is exactly the
    values' size (plus, in 8 bits, a float32 scale per sample, and under autograd the carrier of
    the returning gradient's scales), and the loss falls."""
    steps = 40
    loopback(tmp_path, 2, **PLANS["alternating"], **{
        "train.max_steps": steps, "train.engine": engine, "rpc.activation_dtype": dtype, "train.in_flight": in_flight})
    summary = json.loads((tmp_path / "summary.json").read_text())
    size = {"int8": 1, "float8": 1, "float16": 2, "bfloat16": 2}[dtype]
    extra = 0 if size == 2 else 4 if engine == "relay" else 8
    for cut, values in {"after pool0": 784, "after pool1": 128, "after relu2": 64}.items():
        assert summary["bytes"]["per_cut"][cut]["forward"] == steps * 64 * (values * size + extra), cut
        if engine == "relay":  # autograd's gradients travel inside the backward, not as calls
            assert summary["bytes"]["per_cut"][cut]["backward"] == steps * 64 * (values * size + extra), cut
    losses = [r["loss"] for r in records(tmp_path) if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_run_stopped_at_a_checkpoint_resumes_to_the_untouched_run(loopback, tmp_path):
    """2 edges, dropout on, edge-held data: 6 steps, then the same command again to 12 steps,
    ends with the parameters and the final test loss of one run of 12 steps."""
    keys = {"data.placement": "edge", "train.edge_sync_every": 3, "checkpoint.every_steps": 3, "train.seed": 3,
            "logging.every_steps": 3}
    untouched = loopback(tmp_path / "a", 2, "--resume", "never", **keys, **{"train.max_steps": 12})
    loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 6})
    resumed = loopback(tmp_path / "b", 2, **keys, **{"train.max_steps": 12})
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 12
    assert resumed["test_loss"] == pytest.approx(untouched["test_loss"], abs=1e-6)
    a, b = model_of(tmp_path / "a"), model_of(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert [r["step"] for r in records(tmp_path / "b") if "loss" in r] == [3, 6, 9, 12]  # each step once


def test_a_checkpoint_of_another_plan_is_refused_before_anything_runs(loopback, in_process, mnist_root, tmp_path):
    """The in-process twin of test_checkpoint's torchrun test: one line, exit 2, the run folder as it was."""
    loopback(tmp_path, 1, **{"train.max_steps": 5})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = in_process(*quick_overrides(mnist_root, tmp_path, 1, **{
        "topology.transport": "loopback", "train.max_steps": 10, "model.split": "relu1"}))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert ("was written for plan=edge conv1..pool | central dropout1..fc2, but the config gives "
            "plan=edge conv1..relu1 | central conv2..fc2") in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_edges_are_flushed_at_every_sync_checkpoint_and_epoch_end():
    """Cadence: the flushes, the steps that end a span of batches (no batch in flight across them)."""
    cfg = load_config(None, ["train.edge_sync_every=4", "checkpoint.every_steps=6"])
    cadence = Cadence(cfg, steps_per_epoch=10, total_steps=25)
    assert [s for s in range(1, 26) if cadence.sync(s)] == [4, 8, 10, 12, 16, 20, 24, 25]
    assert [s for s in range(1, 26) if cadence.checkpoint(s)] == [6, 10, 12, 18, 20, 24, 25]
    assert [s for s in range(1, 26) if cadence.flush(s)] == [4, 6, 8, 10, 12, 16, 18, 20, 24, 25]


def test_round_robin_gives_batch_i_to_edge_i_mod_n_and_free_first_to_whoever_asks():
    chunk = [Batch(step, step % 3, None) for step in range(7)]
    taken = []
    lanes = Rotation(chunk).shares(3, lambda b: taken.append(b) or b, [0, 1, 2])
    assert [[b.step for b in lane] for lane in lanes] == [[0, 3, 6], [1, 4], [2, 5]]
    lanes = Queue(chunk).shares(2, lambda b: b, [0, 1])
    first, second = iter(lanes[0]), iter(lanes[1])
    got = [next(first), next(first), next(second), next(first)]
    assert [(b.step, b.edge) for b in got] == [(0, 0), (1, 0), (2, 1), (3, 0)]  # a new record names the lane
    assert chunk[2].edge == 2  # the chunk's own records are left as they were


def test_free_first_hands_a_span_only_to_its_takers():
    chunk = [Batch(step, 0, None) for step in range(5)]
    lanes = Queue(chunk).shares(4, lambda b: b, [1, 2])
    assert lanes[0] == lanes[3] == []
    assert sorted(b.step for lane in (lanes[1], lanes[2]) for b in lane) == list(range(5))


def test_an_edge_that_leaves_gives_back_what_it_took_and_had_not_finished():
    queue = Queue([Batch(step, 0, None) for step in range(6)])
    first, second = queue.shares(2, lambda b: b, [0, 1])
    first, second = iter(first), iter(second)
    took = [next(first), next(first), next(second), next(first)]  # steps 0, 1, 2 and 3
    queue.finished(took[0])  # its turn was taken: trained, whatever happens to edge 0 next
    assert queue.give_back(0) == 2 and len(queue) == 4  # steps 1 and 3 again, ahead of 4 and 5
    assert [(b.step, b.edge) for b in second] == [(1, 1), (3, 1), (4, 1), (5, 1)]
    assert queue.give_back(0) == 0


def test_under_round_robin_a_leaving_edges_batches_leave_the_turns_and_go_round_the_others():
    """1+3, steps 0..8 round robin; edge 1 leaves after step 1's turn: the others' turns skip its
    steps 4 and 7, and the next pass hands them to edges 0 and 2 in turn, in step order."""
    rotation = Rotation([Batch(step, step % 3, None) for step in range(9)])
    turns = rotation.turns(timeout_s=0.05)
    lanes = [list(lane) for lane in rotation.shares(3, lambda b: b, [0, 1, 2])]
    for step in (0, 1):
        turns.wait(step)
        rotation.finished(lanes[step % 3][step // 3])
        turns.done(step)
    assert rotation.give_back(1) == 2
    for step in (2, 3, 5, 6, 8):  # 4 and 7 no longer hold the turn
        turns.wait(step)
        rotation.finished(lanes[step % 3][step // 3])
        turns.done(step)
    again = rotation.turns(timeout_s=0.05)
    lanes = [list(lane) for lane in rotation.shares(3, lambda b: b, [0, 2])]
    assert [[(b.step, b.edge) for b in lane] for lane in lanes] == [[(4, 0)], [], [(7, 2)]]
    with pytest.raises(JobError, match="batch 7 waited"):
        again.wait(7)  # 4 first
    again.wait(4)


def test_each_sync_has_its_edges_per_sync_edges_in_turn():
    """128 edges, 3 per sync, a sync every 20 steps: each sync's 20 batches go round robin to three
    edges, the next three after every sync, and every edge comes round within an epoch."""
    edges = [edge_of(step, 128, 3, 20) for step in range(938)]
    for start in range(0, 938, 20):
        window = edges[start:start + 20]
        assert set(window) == {(start // 20 * 3 + k) % 128 for k in range(3)}
        assert max(map(window.count, window)) - min(map(window.count, window)) <= 1
    assert set(edges) == set(range(128))
    assert [edge_of(step, 5, 0, 4) for step in range(12)] == [edge_of(step, 5, 5, 4) for step in range(12)] == \
        [step % 5 for step in range(12)]  # 0, or every edge: batch i to edge i mod N


def test_a_run_trains_each_sync_on_its_edges_per_sync_edges(loopback, tmp_path):
    """1+5, 2 edges per sync, a sync every 4 steps, 12 steps: edge1 trains in the first and third
    syncs' turns, the others in one each (round robin over all five would give 3, 3, 2, 2, 2)."""
    summary = loopback(tmp_path, 5, **{"train.edges_per_sync": 2, "train.edge_sync_every": 4, "train.max_steps": 12})
    batches = [summary["bytes"]["per_edge"][f"edge{k}"]["batches"] for k in range(1, 6)]
    assert batches == [4, 2, 2, 2, 2], batches


def test_turns_go_in_order_and_a_failure_releases_every_waiter():
    turns = Turns(5, timeout_s=0.05)
    with pytest.raises(JobError, match="batch 6 waited"):
        turns.wait(6)  # 5 has not had its turn
    turns.wait(5)
    turns.done(5)
    turns.wait(6)
    turns.fail()
    with pytest.raises(JobError, match="another edge failed"):
        turns.wait(7)
    first = FirstCome(timeout_s=0.05)
    first.wait(9)  # whoever comes first
    with pytest.raises(JobError, match="waited"):
        first.wait(3)  # one batch at a time
    first.done(9)
    first.wait(3)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["relay", "autograd"])
@pytest.mark.seconds(55)
def test_a_loopback_run_is_the_rpc_run(loopback, mnist_root, tmp_path, engine):
    """The default config (1 central + 3 edges), on torchrun and in one process: the same parameters
    (1e-6; one thread per rank, since reduction order follows the thread count), loss and bytes."""
    keys = {"train.engine": engine, "train.threads": 1, "train.epochs": 1}
    result = run(torchrun_cmd(4, "--config", "configs/mnist.yaml",
                              *quick_overrides(mnist_root, tmp_path / "rpc", edges=3, **keys)))
    assert result.returncode == 0, result.stdout[-3000:]
    on_rpc = json.loads((tmp_path / "rpc" / "summary.json").read_text())
    on_loopback = loopback(tmp_path / "loopback", 3, "--config", "configs/mnist.yaml", **keys)
    assert on_loopback["test_loss"] == pytest.approx(on_rpc["test_loss"], abs=1e-6)
    assert on_loopback["bytes"]["per_cut"] == on_rpc["bytes"]["per_cut"]
    assert on_loopback["bytes"]["train_total"] == on_rpc["bytes"]["train_total"]
    a, b = model_of(tmp_path / "rpc"), model_of(tmp_path / "loopback")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
