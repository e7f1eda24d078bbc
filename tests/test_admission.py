"""A job admits only its own hosts: before the central sends an edge anything, the edge proves it
holds the job's secret (and the central proves it back). A host that cannot is refused with one
line on both sides; a fixed fleet stops, an elastic one goes on without it. In one process on the
loopback transport (fast), and through the launch scripts with real torchrun hosts (slow)."""

import dataclasses
import json
import os
import re
import socket
import subprocess

import pytest
import torch

from split_trainer.cli import launchers
from split_trainer.config import ConfigError
from split_trainer.training.hosting import loopback_transport
from split_trainer.core.errors import printable
from split_trainer.transport import admission

from conftest import ROOT, Lines, child_env, end_tree, free_port, launch, quick_overrides

JOB, OTHER = "job-secret-" + "a" * 20, "not-the-job-" + "b" * 20
HOST = socket.gethostname()
HOW = "launch/edge.sh --secret-file FILE, or SPLIT_TRAINER_SECRET_FILE"
EDGE_LINE = {  # what a refused edge says, by why
    "none": f"refused by the central: this host holds no secret for this job, and the central requires one "
            f"(give it the job's secret: {HOW})",
    "wrong": f"refused by the central: this host's secret is not this job's (give it the central's: {HOW})",
    "unasked": "refused by the central: this host holds a secret and the central has none (give the central the "
               "same secret, or this host none)"}
CENTRAL_SAYS = {"none": "it holds no secret for this job", "wrong": "its secret is not this job's",
                "unasked": "it holds a secret and the central has none"}


def secret_file(path, text=JOB):
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def hosts(in_process, monkeypatch):
    """``hosts(central, edges)``: the next in-process run's central holds ``central`` (None: no
    secret) and each edge named in ``edges`` its own (None: none); the loopback transports built."""
    for var in (admission.SECRET, admission.SECRET_FILE):
        monkeypatch.delenv(var, raising=False)
    built = []

    def arrange(central, edges):
        if central is not None:
            monkeypatch.setenv(admission.SECRET, central)
        loopback = launchers._loopback()
        monkeypatch.setattr(launchers, "_loopback", lambda: dataclasses.replace(
            loopback, transport=lambda cfg, topo: built.append(loopback_transport(cfg, edges)) or built[-1]))
        return built
    return arrange


def loopback_run(mnist_root, run_dir, edges, **keys):
    return quick_overrides(mnist_root, run_dir, edges, **{"topology.transport": "loopback", "train.max_steps": 8,
                                                         "data.limit_train": 1024, "data.limit_test": 200, **keys})


def refusals(err: str) -> list[str]:
    return [line for line in err.splitlines() if "refused" in line]


def test_an_elastic_fleet_goes_on_without_a_host_that_cannot_prove_the_secret(hosts, in_process, mnist_root,
                                                                              tmp_path):
    built = hosts(JOB, {"edge2": OTHER})
    code, out, err = in_process(*loopback_run(mnist_root, tmp_path, 3, **{"topology.min_edges": 2}))
    assert code == 0, err[-3000:]
    assert refusals(err) == [
        f"split_trainer: [edge2] error: {EDGE_LINE['wrong']}",
        f"split_trainer: warning: edge2 (in this process, host {HOST}) refused: its secret is not this job's; "
        f"going on with edge1, edge3"]
    assert sorted(built[0]._edges) == ["edge1", "edge3"]  # edge2's object was never built: nothing reached it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["edges"] == 2
    assert sorted(summary["bytes"]["per_edge"]) == ["edge1", "edge3"]


@pytest.mark.parametrize("central, edge2, why", [(JOB, None, "none"), (JOB, OTHER, "wrong"), (None, OTHER, "unasked")])
def test_a_fixed_fleet_stops_when_a_host_cannot_prove_the_secret(hosts, in_process, mnist_root, tmp_path, central,
                                                                 edge2, why):
    built = hosts(central, {"edge2": edge2})
    code, out, err = in_process(*loopback_run(mnist_root, tmp_path, 2))
    said = f"edge2 (in this process, host {HOST}) refused: {CENTRAL_SAYS[why]}"
    assert code == 2 and err.splitlines() == [
        f"split_trainer: [edge2] error: {EDGE_LINE[why]}",
        f"split_trainer: [edge1] error: the central stopped the job: {said}",
        f"split_trainer: [central] error: {said}; a fixed fleet needs every edge"], err
    assert built[0]._edges == {} and not (tmp_path / "summary.json").exists()


def test_a_job_whose_hosts_all_hold_the_secret_is_the_same_run_as_one_without(hosts, in_process, mnist_root,
                                                                             tmp_path):
    """The secret only admits: with it (here found in the run folder, as launch/central.sh leaves
    it) the run is the run without it, bit for bit."""
    hosts(None, {})
    (tmp_path / "with").mkdir()
    secret_file(tmp_path / "with" / admission.RUN_FOLDER_FILE)
    models = {}
    for name in ("with", "without"):
        code, out, err = in_process(*loopback_run(mnist_root, tmp_path / name, 2))
        assert code == 0 and not refusals(err), err[-3000:]
        models[name] = torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]
    for key, tensor in models["without"].items():
        assert torch.equal(models["with"][key], tensor), key


def test_where_a_rank_finds_the_secret_and_what_it_refuses(tmp_path):
    assert admission.job_key(tmp_path, {}) is None  # nothing anywhere: an unauthenticated job, as before
    assert admission.job_key(tmp_path, {admission.SECRET: f" {JOB}\n"}) == JOB.encode()
    given = secret_file(tmp_path / "given")
    assert admission.job_key(tmp_path, {admission.SECRET_FILE: str(given)}) == JOB.encode()
    secret_file(tmp_path / admission.RUN_FOLDER_FILE, OTHER)
    assert admission.job_key(tmp_path, {}) == OTHER.encode()  # the run folder's, without either variable
    refused = {
        "both": ({admission.SECRET: JOB, admission.SECRET_FILE: str(given)},
                 "both SPLIT_TRAINER_SECRET and SPLIT_TRAINER_SECRET_FILE are set: give the job's secret one way"),
        "short": ({admission.SECRET: "short"}, "the job's secret (SPLIT_TRAINER_SECRET) has 5 characters: use at "
                                               "least 16 (launch/central.sh makes one of 64)"),
        "missing": ({admission.SECRET_FILE: str(tmp_path / "nowhere")},
                    f"the job's secret file {tmp_path / 'nowhere'} cannot be read: No such file or directory"),
    }
    given.chmod(0o644)
    refused["readable"] = ({admission.SECRET_FILE: str(given)}, f"the job's secret file {given} can be read by "
                                                                f"others (mode 644): chmod 600 {given}")
    theirs = secret_file(tmp_path / "theirs")
    os.chown(theirs, 4321, -1)  # as root: another user's file, mode 600 or not
    refused["owner"] = ({admission.SECRET_FILE: str(theirs)}, f"the job's secret file {theirs} belongs to user id "
                                                              f"4321, not to this user (0): use a copy of your own "
                                                              f"(mode 600)")
    for case, (env, line) in refused.items():
        with pytest.raises(ConfigError) as caught:
            admission.job_key(tmp_path, env)
        assert str(caught.value) == line, case
    # A run folder's job.secret that links to nowhere is refused, not taken for no secret at all
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / admission.RUN_FOLDER_FILE).symlink_to(tmp_path / "gone")
    line = f"the job's secret file {dangling / admission.RUN_FOLDER_FILE} cannot be read: No such file or directory"
    for read in (lambda: admission.job_key(dangling, {}), lambda: admission.ensure_file(dangling / "job.secret")):
        with pytest.raises(ConfigError, match="^" + re.escape(line) + "$"):
            read()
    assert not (tmp_path / "gone").exists()


def test_an_edge_answers_one_challenge_and_takes_a_job_only_from_a_central_that_proved_the_secret():
    """An edge is no MAC oracle: it answers the one challenge of the admission it opened as it
    started, with a nonce of its own drawn for it, and builds nothing until the central proved the
    secret back."""
    key, name = JOB.encode(), "edge1"
    side = admission.EdgeSide(name, key)
    with pytest.raises(RuntimeError, match="hears no verdict on a challenge it was not sent"):
        side.hear(admission.Verdict("admitted", b"0" * 32))
    with pytest.raises(RuntimeError, match="not 32 bytes"):
        side.prove(b"short")
    asked = os.urandom(admission.NONCE_BYTES)
    proof = side.prove(asked)
    assert admission._judge(key, name, asked, proof) is None
    assert proof.nonce != admission.EdgeSide(name, key).prove(asked).nonce  # fresh for each admission
    with pytest.raises(RuntimeError, match="answers one challenge per admission"):
        side.prove(os.urandom(admission.NONCE_BYTES))
    with pytest.raises(RuntimeError, match="before the central has proved the job's secret"):
        side.serves()
    assert side.hear(admission.Verdict("admitted", b"0" * 32)) == "it did not prove the job's secret to the edge"
    with pytest.raises(RuntimeError, match="before the central has proved"):
        side.serves()
    honest = admission.EdgeSide(name, key)
    proof = honest.prove(asked)
    assert honest.hear(admission.Verdict("admitted", admission._mac(key, b"central", name.encode(), proof.nonce,
                                                                     asked))) is None
    honest.serves()
    admission.EdgeSide(name, None).serves()  # an unauthenticated job, as before there were secrets


def test_the_central_scripts_secret_is_made_once_readable_only_by_its_owner(tmp_path, capsys, monkeypatch):
    overrides = ["configs/mnist.yaml", "--set", f"output.run_dir={tmp_path / 'run'}"]
    monkeypatch.chdir(ROOT)
    assert admission.main(overrides) == 0
    path = tmp_path / "run" / admission.RUN_FOLDER_FILE
    made = path.read_text()
    assert capsys.readouterr().out == f"{path}\n" and len(made.strip()) == 64 and path.stat().st_mode & 0o777 == 0o600
    assert admission.main(overrides) == 0 and path.read_text() == made  # kept: edge hosts hold copies of it
    given = tmp_path / "given"
    assert admission.main(["--file", str(given), *overrides]) == 0 and given.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("script, args, env, line", [
    ("edge.sh", ["--central", "127.0.0.1:1", "--node", "1", "--edges", "1", "--secret-file", "nowhere/job.secret"], {},
     "--secret-file nowhere/job.secret: no such readable file (a copy of the central's job secret)"),
    ("central.sh", ["--secret-file", "job.secret"], {admission.SECRET: JOB},
     "SPLIT_TRAINER_SECRET and a secret file both give the job's secret: give one")])
def test_a_launch_script_given_a_secret_it_cannot_use_is_one_line(tmp_path, script, args, env, line):
    result = subprocess.run(["bash", str(ROOT / "launch" / script), "--hosts", "1", *args, "--set",
                             f"output.run_dir={tmp_path}"], cwd=ROOT, env=child_env(**env), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == f"launch/{script}: error: {line}"
    assert not (tmp_path / admission.RUN_FOLDER_FILE).exists()  # nothing made for a start that does not happen


# ---- through the launch scripts: real torchrun hosts on loopback addresses ----

def _common(run_dir, mnist_root, **keys):
    base = {"topology.edges": 2, "data.root": mnist_root, "output.run_dir": run_dir, "data.limit_train": 1024,
            "data.limit_test": 200, "train.epochs": 2, "checkpoint.every_steps": 8, "logging.every_steps": 4,
            "rpc.timeout_s": 60, **keys}
    return ["--set", *(f"{k}={v}" for k, v in base.items())]


@pytest.mark.slow
def test_a_fixed_fleet_stops_when_an_edge_host_has_no_secret(mnist_root, tmp_path):
    """The central's script makes the job's secret; an edge host that has none (its run folder is
    elsewhere, and it is given none) is refused before anything reaches it, and both stop."""
    port = free_port()
    central = launch("central.sh", "--hosts", "1", "--port", str(port),
                     *_common(tmp_path / "central", mnist_root, **{"topology.edges": 1}))
    edge = launch("edge.sh", "--central", f"127.0.0.1:{port}", "--hosts", "1", "--node", "1", "--edges", "1",
                  *_common(tmp_path / "edge", mnist_root, **{"topology.edges": 1}))
    outputs = [Lines(central), Lines(edge)]
    try:
        central_out, edge_out = (lines.rest(timeout=240) for lines in outputs)
    finally:
        for proc in (central, edge):
            end_tree(proc.pid)
    secret = tmp_path / "central" / admission.RUN_FOLDER_FILE
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_text().strip() not in central_out + edge_out
    assert (f"central: edge hosts join with: launch/edge.sh --central {HOST}:{port} --hosts 1 --node N --edges E "
            f"--max-restarts 0 --secret-file {secret}") in central_out
    said = f"edge1 (rank 1, host {HOST}) refused: it holds no secret for this job"
    assert central.returncode != 0 and f"split_trainer: [central] error: {said}; a fixed fleet needs every edge" \
        in central_out, central_out[-3000:]
    assert edge.returncode != 0 and f"split_trainer: [edge1] error: {EDGE_LINE['none']}" in edge_out, edge_out[-3000:]
    assert not (tmp_path / "central" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.seconds(65)
def test_an_elastic_fleet_refuses_a_host_with_another_secret_and_finishes_without_it(mnist_root, tmp_path,
                                                                                    own_loopback):
    """Edge host 1 finds the job's secret in the run folder (the central's script made it there);
    edge host 2 holds another. Host 2 is refused, stops its own torchrun agent (without closing the
    job's rendezvous), the others meet again without it and the job finishes."""
    port, common = free_port(), _common(tmp_path, mnist_root)
    elastic = ["--hosts", "1:2", "--addr", "127.0.0.1", "--max-restarts", "3"]
    central = launch("central.sh", "--port", str(port), "--wait", "2", *elastic, *common, within=own_loopback,
                     IFNAME="lo")
    out = Lines(central)
    out.wait_for(lambda line: line.startswith("central: edge hosts join with"), timeout=60)  # the secret is made
    wrong = secret_file(tmp_path / "other.secret", OTHER)
    hosts = [central] + [launch("edge.sh", "--central", f"127.0.0.1:{port}", "--node", str(node), "--edges", "1",
                                *elastic, *extra, *common, within=own_loopback, IFNAME="lo")
                         for node, extra in ((1, []), (2, ["--secret-file", str(wrong)]))]
    try:
        refused = out.wait_for(lambda line: "refused" in line, timeout=300)
        intruder = Lines(hosts[2]).rest(timeout=120)  # it stops by itself
        text = out.rest(timeout=400)
        hosts[1].wait(timeout=120)
    finally:
        for host in hosts:
            end_tree(host.pid)
    assert refused.startswith("split_trainer: [central] error: edge2 (rank ") and refused.rstrip().endswith(
        f", host {HOST}) refused: its secret is not this job's; the others meet again without it"), refused
    assert f"split_trainer: [edge2] error: {EDGE_LINE['wrong']}" in intruder, intruder[-3000:]
    assert hosts[2].returncode != 0  # its torchrun stopped by the signal its refused worker sent
    assert central.returncode == 0 and hosts[1].returncode == 0, text[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 32 and sorted(summary["bytes"]["per_edge"]) == ["edge1"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["edges"] == ["edge1"] for r in records if r.get("event") == "membership")  # edge2 was never in


def test_a_proof_of_another_type_is_refused_and_a_peers_host_name_prints_escaped():
    """A proof is a peer's word: a MAC that is no bytes is a wrong one, not a TypeError; a host name
    with a newline and an ANSI code cannot forge a line of the central's log."""
    key, nonce = b"k" * 32, b"n" * admission.NONCE_BYTES
    for mac, their_nonce in (("0" * 64, nonce), (1234, nonce), (b"0" * 32, None)):
        assert admission._judge(key, "edge1", nonce, admission.Proof("h", their_nonce, mac)) == "wrong"
    forged = "evil\nsplit_trainer: [central] done: steps 64\x1b[2J"
    assert printable(forged) == "evil\\nsplit_trainer: [central] done: steps 64\\x1b[2J"
