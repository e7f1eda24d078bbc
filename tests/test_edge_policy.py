"""An edge decides what leaves it (training.policy): a central that asks, by its config or by its
calls, for the edge's labels, its raw inputs or its weights is refused before the edge computes
anything, with the edge's own line on its side and repeated by the central. In one process on the
loopback transport (the edges built from their own configs, the central from the hostile one), and
through the launch scripts with real torchrun hosts (slow)."""

import dataclasses
import threading

import pytest

from split_trainer.cli import launchers
from split_trainer.config import load_config
from split_trainer.data import placement
from split_trainer.training.hosting import EdgeHost
from split_trainer.transport.loopback import LoopbackTransport

from conftest import ROOT, end_tree, free_port, launch, quick_overrides

PRIVATE = ROOT / "configs" / "mnist_private.yaml"
SMALL = {"train.max_steps": 4, "data.limit_train": 512, "data.limit_test": 128, "data.partition": "iid"}
RAW = {"model.name": "mlp", "model.split": "flatten", "model.plan": "null", "model.bottleneck": "null",
       "privacy.edge_weights": "central", "privacy.nopeek": 0, "privacy.adversary": 0}
"""The central's config that made an edge send its raw pixels and its labels (issue 37)."""


def overrides(mnist_root, run_dir, edges, **keys):
    return quick_overrides(mnist_root, run_dir, edges, **{"topology.transport": "loopback", **SMALL, **keys})


@pytest.fixture
def edges_own(in_process, monkeypatch):
    """``edges_own(config, argv)``: the next in-process run's edges are built from their own config
    (``config`` with ``argv``), whatever the central's says."""
    def arrange(config, argv):
        own = load_config(config, argv[1:])
        loopback = launchers._loopback()
        monkeypatch.setattr(launchers, "_loopback", lambda: dataclasses.replace(
            loopback, transport=lambda cfg, topo: LoopbackTransport(cfg, EdgeHost(own, [1, 2]))))
        return None  # nothing to join: the edges live in the central's transport
    return arrange


GRPC = {"topology.transport": "grpc", "train.engine": "relay", "rpc.startup_timeout_s": 30}


def dialling_edges(own_config, argv, run_dir):
    """Edges 1 and 2 on threads of this process, each dialling the grpc central with its own config
    (``own_config`` with ``argv``); returns the join: the errors they ended with, by edge number."""
    from split_trainer.transport.grpc_edge import serve_edge_in_run_folder

    own, errors = load_config(own_config, argv[1:]), {}

    def edge(k):
        try:
            serve_edge_in_run_folder(run_dir, f"edge{k}", EdgeHost(own, [k]), own)
        except Exception as exc:
            errors[k] = exc
    threads = [threading.Thread(target=edge, args=(k,), daemon=True) for k in (1, 2)]
    for thread in threads:
        thread.start()

    def join():
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        return errors
    return join


def edge_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("split_trainer: [edge")]


def test_a_central_whose_config_asks_for_raw_inputs_and_labels_is_refused(edges_own, in_process, mnist_root,
                                                                          tmp_path):
    edges_own(PRIVATE, overrides(mnist_root, tmp_path, 2))
    code, out, err = in_process("--config", str(PRIVATE), *overrides(mnist_root, tmp_path, 2, **RAW))
    expected = ("edge1 refuses the central's config, which gives model.name=mlp (this edge: mnist_cnn); "
                "model.split=flatten (this edge: None); model.plan=None (this edge: [{\"place\":\"edge\",\"until\":"
                "\"pool\"},{\"place\":\"central\",\"until\":\"dropout2\"},{\"place\":\"edge\"}]); "
                "model.bottleneck=None (this edge: 4); privacy.edge_weights=central (this edge: edges); "
                "privacy.nopeek=0.0 (this edge: 1.0); privacy.adversary=0.0 (this edge: 10.0): start the central "
                "with the edges' settings, or change this edge's own config")
    assert code == 1 and edge_lines(err) == [f"split_trainer: [edge1] error: {expected}"], err[-3000:]
    assert err.splitlines()[-1] == f"split_trainer: [central] error: {expected}", err[-3000:]  # the central repeats it
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("transport", ["loopback", "grpc"])
def test_a_central_that_asks_for_the_labels_of_a_u_shaped_edge_is_refused(edges_own, in_process, mnist_root,
                                                                         tmp_path, monkeypatch, transport):
    """The hostile central's own code asks for the labels in its batch references: the edge's plan,
    not the reference, says whether they leave. On loopback, and with the edges dialling a grpc
    central from threads of their own."""
    honest = placement.EdgeData.__init__
    monkeypatch.setattr(placement.EdgeData, "__init__", lambda self, cfg, labels_here: honest(self, cfg, True))
    argv = overrides(mnist_root, tmp_path, 2, **(GRPC if transport == "grpc" else {}))
    join = dialling_edges(PRIVATE, argv, tmp_path) if transport == "grpc" else edges_own(PRIVATE, argv)
    code, out, err = in_process("--config", str(PRIVATE), *argv)
    errors = join() if join else {}
    expected = ("refuses to send the labels of its train batch 0: its own plan keeps the labels on the edge "
                "(the loss is computed there)")
    refused = [line for line in edge_lines(err) if line.endswith(expected)]  # each edge's first batch is its 0
    assert code == 1 and refused and all(line.startswith(f"split_trainer: [{line[16:21]}] error: {line[16:21]} ")
                                         for line in refused), err[-3000:]
    central = [line for line in err.splitlines() if line.startswith("split_trainer: [central] error:")]
    assert len(central) == 1 and central[0].endswith(expected), err[-3000:]
    assert transport == "loopback" or sorted(errors) == [1, 2], errors
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("accepts", [False, True])
def test_a_segment_that_sends_raw_inputs_runs_only_where_the_edge_accepts_it(in_process, mnist_root, tmp_path,
                                                                            accepts):
    """Even when the edge's own config asks for it: a first segment with no learned layer sends the
    edge's pixels as they are, so the edge must say so itself."""
    keys = {**RAW, "data.placement": "edge", "privacy.raw_inputs": accepts}
    code, out, err = in_process(*overrides(mnist_root, tmp_path, 2, **keys))
    if accepts:
        assert code == 0, err[-3000:]
        return
    expected = ("edge1 refuses to send its raw inputs: its first segment (flatten) has no learned layer before the "
                "cut; cut after a learned layer (model.split), or set privacy.raw_inputs=true in this edge's own "
                "config")
    assert code == 1 and edge_lines(err) == [f"split_trainer: [edge1] error: {expected}"], err[-3000:]
    assert not (tmp_path / "summary.json").exists()


def test_central_held_data_needs_no_consent_to_send_inputs(in_process, mnist_root, tmp_path):
    """With the data on the central, the inputs are the central's to begin with."""
    code, out, err = in_process(*overrides(mnist_root, tmp_path, 2, **RAW))
    assert code == 0, err[-3000:]


def test_on_grpc_the_edges_refuse_the_hostile_central(in_process, mnist_root, tmp_path):
    """The central in this process, each edge on a thread that dials it with its own config."""
    join = dialling_edges(PRIVATE, quick_overrides(mnist_root, tmp_path, 2, **SMALL, **GRPC), tmp_path)
    code, out, err = in_process("--config", str(PRIVATE), *quick_overrides(mnist_root, tmp_path, 2, **SMALL,
                                                                           **GRPC, **RAW))
    errors = join()
    refusal = "refuses the central's config, which gives model.name=mlp (this edge: mnist_cnn); model.split=flatten"
    # whichever edge the central connects first refuses, and the central stops the job on it
    assert code != 0 and any(f"split_trainer: [edge{k}] error: edge{k} {refusal}" in err for k in (1, 2)), err[-3000:]
    central = [line for line in err.splitlines() if line.startswith("split_trainer: [central] error:")]
    assert len(central) == 1 and refusal in central[0], err[-3000:]  # (gRPC's own log lines may follow it)
    assert sorted(errors) == [1, 2], errors
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.seconds(25)
def test_on_rpc_hosts_the_edges_refuse_the_hostile_central(mnist_root, tmp_path):
    """Two torchrun hosts, as launch/central.sh and launch/edge.sh start them: the edges run the
    private config, the central the one that asked for pixels and labels. Nothing is trained."""
    port = free_port()
    common = ["--config", str(PRIVATE), *quick_overrides(mnist_root, tmp_path, 2, **SMALL, **{"rpc.timeout_s": 20})]
    hostile = [*common, *(f"{k}={v}" for k, v in RAW.items())]
    central = launch("central.sh", "--hosts", "1", "--port", str(port), *hostile)
    edge = launch("edge.sh", "--central", f"127.0.0.1:{port}", "--hosts", "1", "--node", "1", "--edges", "2", *common)
    try:
        central_out = central.communicate(timeout=240)[0]
        edge_out = edge.communicate(timeout=240)[0]
    finally:
        for proc in (central, edge):
            end_tree(proc.pid)
    refusal = "refuses the central's config, which gives model.name=mlp (this edge: mnist_cnn); model.split=flatten"
    assert central.returncode != 0 and edge.returncode != 0, central_out[-3000:] + edge_out[-3000:]
    assert f"split_trainer: [edge1] error: edge1 {refusal}" in edge_out, edge_out[-3000:]
    assert f'File "{ROOT / "split_trainer"}' not in edge_out, edge_out  # a line, not a crash (torchrun's report aside)
    central_line = [line for line in central_out.splitlines() if line.startswith("split_trainer: [central] error")]
    assert len(central_line) == 1 and refusal in central_line[0], central_out[-3000:]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.seconds(5)
def test_evaluate_reads_the_data_where_you_say_not_where_the_checkpoint_says(trained_run, in_process, mnist_root,
                                                                            tmp_path, monkeypatch):
    """A checkpoint's data.root (and data.download) are the writer's: evaluate uses yours, here the
    default (data/mnist, from where you run it)."""
    run_dir, _ = trained_run
    monkeypatch.chdir(tmp_path)
    code, out, err = in_process("evaluate", "--checkpoint", str(run_dir / "checkpoints"), "--set",
                                "data.download=false")
    assert code == 2 and "data/mnist" in err and str(mnist_root) not in err, err[-3000:]
    assert not (tmp_path / "data").exists()
