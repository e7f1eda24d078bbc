"""Edges that come and go: an elastic fleet of three torchrun nodes on this machine (torchrun's
c10d rendezvous through the launch scripts, loopback), checkpoints that resume under another
edge count, and free_first dispatch around a slow edge."""

import json
from pathlib import Path

import pytest
import torch

from conftest import (Lines, child_env, end_tree, free_port, launch, loopback_cmd, loopback_overrides, made_once,
                      quick_overrides, run, torchrun_cmd)

pytestmark = pytest.mark.slow


def _records(run_dir, event=None):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == event]


@pytest.mark.seconds(115)
def test_an_edge_host_lost_mid_run_leaves_a_job_that_finishes_and_takes_it_back(mnist_root, tmp_path, own_loopback):
    """Edge host 2 (agent and worker) is killed with SIGKILL mid-run: the others meet again without
    it and go on; started again, it is admitted at the next rendezvous and trains."""
    # 3 epochs: the job alone must still be training when the host that comes back has started and
    # met the others (about 16 s here: it joined at step 64 of 192).
    port, total = free_port(), 3 * 64
    common = ["--set", "topology.edges=2", f"data.root={mnist_root}", f"output.run_dir={tmp_path}",
              "data.limit_train=4096", "data.limit_test=1000", "train.epochs=3", "checkpoint.every_steps=16",
              "logging.every_steps=8", "rpc.timeout_s=60"]
    elastic = ["--hosts", "1:2", "--addr", "127.0.0.1", "--max-restarts", "3"]

    def edge_host(node: int):
        return launch("edge.sh", "--central", f"127.0.0.1:{port}", "--node", str(node), "--edges", "1", *elastic,
                      *common, within=own_loopback, IFNAME="lo")

    central = launch("central.sh", "--port", str(port), "--wait", "2", *elastic, *common, within=own_loopback,
                     IFNAME="lo")
    hosts = [central, edge_host(1), edge_host(2)]
    try:
        out = Lines(central)
        out.wait_for(lambda line: line.startswith("step 64/"), timeout=300)  # both edges at work
        end_tree(hosts[2].pid)  # the whole host: its agent and its worker
        left = out.wait_for(lambda line: "edge2 left" in line, timeout=300)
        alone = out.wait_for(lambda line: line.startswith("step "), timeout=300)  # training goes on without it
        hosts.append(edge_host(2))
        joined = out.wait_for(lambda line: "edge2 joined" in line, timeout=300)
        text = out.rest(timeout=400)
        for host in hosts[1::2]:
            host.wait(timeout=120)
    finally:
        for host in hosts:
            end_tree(host.pid)
    assert central.returncode == 0 and hosts[1].returncode == 0 and hosts[3].returncode == 0, text[-3000:]
    assert "1 of 1..2 edges present; edge2 left at step" in left and "edges ok 1/1" in alone
    assert "2 of 1..2 edges present; edge2 joined at step" in joined
    changes = [(r["left"], r["joined"], r["step"]) for r in _records(tmp_path, "membership")]
    assert changes[0][:2] == ([], []) and (["edge2"], [], changes[1][2]) in changes
    assert changes[-1][:2] == ([], ["edge2"]) and changes[-1][2] >= changes[1][2]
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert len(steps) == len(set(steps)) and steps[-1] == total  # every step once, to the end
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == total and summary["edges"] == 2
    assert summary["bytes"]["per_edge"]["edge2"]["batches"] > 0  # trained since it came back


@pytest.fixture(scope="session")
def slow_edge_runs(mnist_root, tmp_path_factory) -> dict:
    """1+3, 64 steps under each dispatch mode. free_first: a torchrun job, edge3 spending 100 ms
    more on every training call. round_robin hands out batches whatever the edges' speeds: the
    same config in one process (loopback)."""
    keys = {"train.epochs": 2}

    def train(folder: Path) -> None:
        result = run(loopback_cmd(mnist_root, folder / "round_robin", 3, **keys, **{"train.dispatch": "round_robin"}))
        assert result.returncode == 0, result.stdout[-3000:]
        result = run(torchrun_cmd(4, *quick_overrides(mnist_root, folder / "free_first", edges=3, **keys, **{
            "train.dispatch": "free_first"})), env=child_env(SPLIT_TRAINER_FAULT="edge3:train:1:slow"))
        assert result.returncode == 0, result.stdout[-3000:]

    folder = made_once(tmp_path_factory, "slow_edge_runs", train)
    return {mode: folder / mode for mode in ("round_robin", "free_first")}


@pytest.mark.seconds(70)
def test_free_first_lets_a_slow_edge_take_fewer_batches_and_learns_as_well(slow_edge_runs):
    """Round robin gives the slow edge a third of the batches regardless; free_first gives it
    fewer, and accuracy stays in the same band."""
    summaries = {mode: json.loads((d / "summary.json").read_text()) for mode, d in slow_edge_runs.items()}
    batches = {mode: {name: edge["batches"] for name, edge in s["bytes"]["per_edge"].items()}
               for mode, s in summaries.items()}
    assert max(batches["round_robin"].values()) - min(batches["round_robin"].values()) <= 1, batches  # 22+21+21
    assert batches["free_first"]["edge3"] < min(batches["free_first"]["edge1"], batches["free_first"]["edge2"]), batches
    assert sum(batches["free_first"].values()) == sum(batches["round_robin"].values()) == 64
    accuracy = {mode: s["test_accuracy"] for mode, s in summaries.items()}
    assert accuracy["free_first"] > 0.8 and abs(accuracy["free_first"] - accuracy["round_robin"]) < 0.05, accuracy


def test_a_checkpoint_of_three_edges_resumes_on_two_and_on_four(in_process, mnist_root, slow_edge_runs, tmp_path):
    """The round-robin run's checkpoint, resumed by fleets of another size."""
    saved = slow_edge_runs["round_robin"] / "checkpoints" / "step_00000032"  # the end of epoch 1
    for edges, change in ((2, "edge3 left"), (4, "edge4 joined")):
        code, out, err = in_process("--resume", str(saved), *loopback_overrides(
            mnist_root, tmp_path / str(edges), edges, **{"train.epochs": 2, "train.max_steps": 40,
                                                         "train.edges_per_sync": 0}))  # every edge trains
        assert code == 0, (out + err)[-3000:]
        lines = [line for line in out.splitlines() if line.startswith("membership: ")]
        assert lines == [f"membership: {edges} edges present; {change} at step 32 (was edge1, edge2, edge3)"
                         + ("; edge4 from the average of the checkpoint's edge weights, optimizer fresh"
                            if edges == 4 else "")], (out + err)[-3000:]
        summary = json.loads((tmp_path / str(edges) / "summary.json").read_text())
        assert summary["resumed_from_step"] == 32 and summary["steps"] == 40 and summary["edges"] == edges
        assert all(edge["batches"] > 0 for edge in summary["bytes"]["per_edge"].values())


@pytest.mark.seconds(85)
def test_edge_held_data_of_an_edge_away_waits_for_it_where_it_stopped(in_process, mnist_root, tmp_path):
    """Edge placement: with edge2 away its shard is not trained on, evaluation covers edge1 only,
    and when edge2 is back it continues in its shard where it stopped. The first 16 steps, both
    edges present, run in one process (loopback); then torchrun jobs of one edge, then two."""
    keys = {"data.partition": "iid", "checkpoint.every_steps": 8, "topology.min_edges": 1}
    common = ["--config", "configs/mnist_edge_data.yaml", "--resume", "auto",
              *quick_overrides(mnist_root, tmp_path, edges=2, **keys)]

    def until(nproc: int, steps: int) -> str:
        result = run(torchrun_cmd(nproc, *common, f"train.max_steps={steps}"))
        assert result.returncode == 0, result.stdout[-3000:]
        return result.stdout

    def served(step: int) -> dict:
        part = torch.load(tmp_path / "checkpoints" / f"step_{step:08d}" / "central.pt", weights_only=True)
        return part["progress"]["served"]

    code, out, err = in_process(*common, "topology.transport=loopback", "train.max_steps=16")
    assert code == 0, (out + err)[-3000:]
    assert served(16) == {"edge1": 8, "edge2": 8}
    away = until(2, 32)
    assert ("membership: 1 of 1..2 edges present; edge2 left at step 16 (was edge1, edge2); edge2's data is not "
            "trained on while away") in away
    assert served(32) == {"edge1": 24, "edge2": 8}
    assert list(_records(tmp_path, "eval")[-1]["per_edge"]) == ["edge1"]
    back = until(3, 48)
    assert "membership: 2 of 1..2 edges present; edge2 joined at step 32 (was edge1)" in back
    assert served(48) == {"edge1": 32, "edge2": 16}  # edge2 went on from its 8th batch
