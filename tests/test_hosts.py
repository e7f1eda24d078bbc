"""Two torchrun nodes on this machine (static rendezvous, loopback), started the way the README's
two-terminal workflow starts them: launch/central.sh on one "host", launch/edge.sh on the other."""

import json
import subprocess

import pytest

from conftest import ROOT, child_env, end_tree, free_port, launch

LAUNCH = ROOT / "launch"


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            end_tree(proc.pid)
    return outputs


@pytest.mark.slow
def test_two_hosts_train_with_the_data_only_on_the_edges(mnist_root, tmp_path):
    """The central's data.root does not exist: in edge placement it never opens, receives or asks
    for an input. Two edges on the edge host, IID shards, the default single cut."""
    port = free_port()
    common = ["--config", "configs/mnist_edge_data.yaml", "--set", "topology.edges=2", "data.partition=iid",
              "data.limit_train=4096", "data.limit_test=1000", "train.epochs=1", f"output.run_dir={tmp_path}",
              "logging.every_steps=8"]
    central = launch("central.sh", "--hosts", "1", "--port", str(port), *common, f"data.root={tmp_path / 'nowhere'}")
    edge = launch("edge.sh", "--central", f"127.0.0.1:{port}", "--hosts", "1", "--node", "1", "--edges", "2",
                  *common, f"data.root={mnist_root}")
    central_out, edge_out = _finish([central, edge])
    assert central.returncode == 0 and edge.returncode == 0, central_out[-3000:] + edge_out[-3000:]
    assert "on the edges (iid shards" in central_out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 64 and summary["test_accuracy"] > 0.8
    for name, traffic in summary["bytes"]["per_edge"].items():
        assert traffic["sent"]["inputs"] == 0 and traffic["received"].get("inputs", 0) == 0, name
        assert traffic["received"]["labels"] > 0  # the loss is on the central: labels come, inputs never
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert partition["edge1"]["train"] + partition["edge2"]["train"] == 4096
    assert not (tmp_path / "nowhere").exists()


def test_an_edge_host_that_runs_more_edges_than_the_topology_is_one_line():
    result = subprocess.run(["bash", str(LAUNCH / "edge.sh"), "--central", "127.0.0.1:1", "--hosts", "1", "--node",
                             "1", "--edges", "5", "--config", "configs/mnist.yaml"], cwd=ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("launch/edge.sh: error: --edges 5 is more than topology.edges=3 in "
                                     "configs/mnist.yaml: run at most 3 here")


@pytest.mark.slow
def test_hosts_whose_counts_disagree_with_the_topology_stop_with_one_line(tmp_path):
    """Each host's count is fine alone, but 1 + 2 ranks do not make 1 central + 3 edges."""
    port = free_port()
    common = ["--set", f"output.run_dir={tmp_path}", f"data.root={tmp_path}"]
    central = launch("central.sh", "--hosts", "1", "--port", str(port), *common)
    edge = launch("edge.sh", "--central", f"127.0.0.1:{port}", "--hosts", "1", "--node", "1", "--edges", "2", *common)
    central_out, edge_out = _finish([central, edge], timeout=180)
    assert central.returncode != 0 and edge.returncode != 0
    line = "world size 3 does not match topology.edges=3: 1 central + 3 edges needs 4 ranks"
    assert line in central_out and line in edge_out
