"""Hosts that accept no inbound connection (edges behind NAT or a site firewall), each a network
namespace this test makes and removes: the grpc transport's two commands train through them, an
edge killed and started again included, and the rpc transport cannot form its group there."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, end_tree, loopback_overrides

spec = importlib.util.spec_from_file_location("links", ROOT / "benchmarks" / "links.py")
links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(links)

needs_netns = pytest.mark.skipif(os.geteuid() != 0 or not links.shutil.which("tc"),
                                 reason="network namespaces need root and iproute2")
# 2,048 samples in edge placement (Dirichlet shards), batch 64: 32 steps; checkpoints every 10.
KEYS = {"train.epochs": 1, "checkpoint.every_steps": 10, "train.edge_sync_every": 10, "rpc.timeout_s": 20,
        "rpc.startup_timeout_s": 45}
WAIT_S = 240


def _overrides(mnist: Path, run_dir: Path) -> list[str]:
    """The loopback run's keys, less its transport and run folder: the run the hosts must make."""
    keys = loopback_overrides(mnist, run_dir, 3, **KEYS)[1:]
    return [k for k in keys if not k.startswith(("topology.transport=", "output.run_dir="))]


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    try:
        return [proc.wait(timeout=WAIT_S) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            end_tree(proc.pid)
        pytest.fail("a host did not end:\n" + "\n".join(log.read_text()[-1500:] for log in logs))


@pytest.mark.slow
@needs_netns
@pytest.mark.seconds(130)
def test_edges_that_refuse_inbound_connections_train_on_grpc_and_not_on_rpc(mnist_root, loopback, tmp_path):
    """1 central + 3 edge hosts, edge placement: on grpc (serve, edge) the job trains to the end
    through two faults, each process started again with its own command: edge2 killed (it redials;
    the central resumes in its own process from the newest checkpoint), then the central killed
    (every edge redials its new process, which resumes). It ends where an untouched run ends
    (1e-6). The same hosts on rpc: the group never forms, and every host says why in one line."""
    untouched = loopback(tmp_path / "untouched", 3, "--config", "configs/mnist_edge_data.yaml", **KEYS)
    overrides = _overrides(mnist_root, tmp_path / "untouched")
    prefix = f"stg{os.getpid() % 10000}"
    try:
        with links.hosts(prefix, 3, None, inbound=False) as net:
            run_dir = tmp_path / "grpc"
            started = links.commands(net, "grpc", overrides, run_dir)
            faults = {0: "central:train:12:kill:1", 2: "edge2:train:8:kill"}
            procs = [links.spawn(ns, cmd, log, **({"SPLIT_TRAINER_FAULT": faults[k]} if k in faults else {}))
                     for k, (ns, cmd, log) in enumerate(started)]
            logs = [log for _, _, log in started]
            assert _wait([procs[2]], logs) == [137]  # edge2 killed itself at its 8th batch
            procs[2] = links.spawn(*started[2])  # the same command again, without the fault
            assert _wait([procs[0]], logs) == [137]  # the central, at its 12th batch after resuming
            procs[0] = links.spawn(*started[0])
            codes = _wait(procs, logs)
            assert codes == [0, 0, 0, 0], "\n".join(log.read_text()[-1500:] for log in logs)

            rpc_dir = tmp_path / "rpc"
            started = links.commands(net, "rpc", [*overrides, "rpc.channels=[basic]"], rpc_dir)
            refused = _wait([links.spawn(*host) for host in started], [log for _, _, log in started])
    finally:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 20 and summary["steps"] == untouched["steps"]
    assert abs(summary["test_loss"] - untouched["test_loss"]) < 1e-6
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (tmp_path / "untouched", run_dir))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    central = logs[0].read_text()
    assert "edge2" in central and "attempt 2 of 4 resumes from the newest checkpoint" in central, central[-2000:]
    for log in logs[1:]:  # every edge dialled the central's new process
        assert "the stream to the central" in log.read_text() and "dialling it again" in log.read_text(), \
            log.read_text()[-2000:]

    assert all(code != 0 for code in refused) and not (rpc_dir / "summary.json").exists()
    for _, _, log in started:
        assert "the RPC group did not form" in log.read_text(), log.read_text()[-2000:]  # on its own, or after a peer
