"""Privacy: the defences change what leaves an edge as specified (both engines), edge-held weights
never reach the central, and the audit finds the leaks it is there to find."""

import json
import pickle

import pytest
import torch

from split_trainer.config import PrivacyConfig, TrainConfig, load_config
from split_trainer.core.hops import Hop, HopKind
from split_trainer.model.plan import build_plan
from split_trainer.privacy.defences import Defences, distance_correlation, epsilon
from split_trainer.records import checkpoint
from split_trainer.training.engines import ENGINES
from split_trainer.training.stage import Stage

from conftest import child_env, loopback_cmd, quick_overrides, run, torchrun_cmd

MNIST = {"in_channels": 1, "image_size": 28, "num_classes": 10}
U_PLAN = "[{place: edge, until: pool}, {place: central, until: dropout2}, {place: edge}]"


def _edge(engine: str, **privacy) -> tuple:
    """The edge side of the U-shaped plan, as an edge host builds it."""
    cfg = load_config(None, [f"model.plan={U_PLAN}", f"train.engine={engine}"])
    plan = build_plan(cfg.model, MNIST, seed=0)
    stage = Stage(plan.on("edge"), TrainConfig(engine=engine))
    defences = Defences(PrivacyConfig(**privacy), plan.places)
    return ENGINES[engine].build(TrainConfig(engine=engine), plan.places, stage, None, defences), plan


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_activations_leave_clipped_and_noised_as_configured(engine):
    x = torch.randn(64, 1, 28, 28) * 3
    clipped, _ = _edge(engine, clip=2.0)
    out = clipped.run(Hop(HopKind.FORWARD, 0, "edge"), x, None, 0.01).output
    norms = out.detach().flatten(1).norm(dim=1)
    assert norms.max() <= 2.0 + 1e-4 and norms.min() > 1.9  # every sample was longer than 2: all clipped

    noisy, _ = _edge(engine, clip=2.0, noise=0.5)
    torch.manual_seed(0)
    noised = noisy.run(Hop(HopKind.FORWARD, 0, "edge"), x, None, 0.01).output.detach()
    difference = noised - out.detach()  # the same weights: what is left is the noise
    assert abs(difference.mean()) < 0.01 and abs(difference.std() - 0.5 * 2.0) < 0.01


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_nopeek_adds_its_gradient_to_the_edges_own(engine):
    """The edge's weights get the gradient that comes back plus nopeek x d(distance correlation):
    with nothing coming back, exactly the latter."""
    x, nothing = torch.randn(32, 1, 28, 28), torch.zeros(32, 64, 12, 12)
    edge, plan = _edge(engine, nopeek=3.0)
    reply = edge.train_hop(Hop(HopKind.FORWARD, 0, "edge"), x, None, 0.0)
    out = edge.pending[0][-1][1] if engine == "relay" else reply.output  # relay keeps the graph at home
    conv = plan.segments[0].module.conv1.weight
    got = torch.autograd.grad(out, conv, nothing)[0]
    expected = torch.autograd.grad(3.0 * distance_correlation(x, plan.segments[0].module(x)), conv)[0]
    assert expected.norm() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("engine", ["relay", "autograd"])
def test_the_returned_gradient_carries_label_noise_scaled_to_the_largest(engine):
    """U-shaped plan: the gradient the edge sends back for its last segment's input."""
    a, y = torch.randn(256, 128), torch.randint(0, 10, (256,))

    def returned(label_noise: float) -> torch.Tensor:
        edge, _ = _edge(engine, label_noise=label_noise)
        torch.manual_seed(1)
        hop = Hop(HopKind.TURNAROUND if engine == "relay" else HopKind.LOSS, 2, "edge")
        if engine == "relay":
            return edge.train_hop(hop, a, y, 0.0).output
        x = a.clone().requires_grad_()
        return torch.autograd.grad(edge.train_hop(hop, x, y, 0.0).loss, x)[0]

    clean, noisy = returned(0.0), returned(2.0)
    largest = clean.norm(dim=1).max()
    assert abs((noisy - clean).std() - 2.0 * largest / 128 ** 0.5) < 0.05 * largest / 128 ** 0.5


def test_epsilon_is_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.5 / 2, 1.0, 6)]  # noise 1.5 x clip on sensitivity 2 x clip; each sample once an epoch
    assert epsilon(PrivacyConfig(clip=1.0, noise=1.5), 6) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)
    assert epsilon(PrivacyConfig(), 6) is None


def test_the_label_attack_on_a_model_that_learned_nothing_scores_the_largest_class():
    """A diverged edge (say, too strong a NoPeek) sends back identical or non-finite gradients: the
    audit says the attacker learns nothing from them rather than failing."""
    from split_trainer.privacy.attacks import kmeans, matched_accuracy

    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    for points in (torch.ones(10, 4), torch.full((10, 4), float("nan"))):
        assert matched_accuracy(kmeans(points, 3, seed=0), labels, 3) == pytest.approx(0.6)
    separable = torch.nn.functional.one_hot(labels, 3).float() * 10
    assert matched_accuracy(kmeans(separable, 3, seed=0), labels, 3) == 1.0


# The small decoder alone: these tests ask whether a leak is found, not which capacity finds it most.
AUDIT = ["--decoders", "small", "--public", "1000", "--private", "400", "--reidentify", "60", "--candidates", "30", "--decoder-epochs", "6",
         "--inversions", "4", "--inversion-steps", "60", "--unsplit", "8", "--unsplit-rounds", "5", "--hijack-steps", "0"]


@pytest.mark.parametrize("bad, says", [(["--public", "0"], "--public: must be a whole number of at least 1"),
                                       (["--private", "10"], "--reidentify 200 is more than the --private 10")])
def test_the_audit_refuses_counts_that_would_report_nan(in_process, tmp_path, bad, says):
    code, out, err = in_process("audit", "--checkpoint", str(tmp_path), *bad)
    assert code == 2 and says in (out + err).splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.seconds(20)
def test_the_audit_finds_the_leak_of_an_undefended_cut(trained_run, in_process, mnist_root, tmp_path):
    run_dir, _ = trained_run
    code, out, err = in_process("audit", "--checkpoint", str(run_dir / "checkpoints"), "--set",
                                f"data.root={mnist_root}", "--out", str(tmp_path), *AUDIT)
    assert code == 0, (out + err)[-3000:]
    report = json.loads((tmp_path / "audit.json").read_text())
    decoder = report["cuts"]["after pool"]["decoder"]
    assert decoder["ssim"] > decoder["class_mean_ssim"] + 0.1, decoder
    assert decoder["reidentified"] > 10 * decoder["chance"], decoder
    assert (tmp_path / "audit.png").stat().st_size > 1000 and "re-id" in out


def test_the_worst_case_decoder_is_the_one_that_reidentifies_most_then_the_sharpest():
    from split_trainer.privacy.attacks import worst_case

    rows = {"small": {"reidentified": 0.40, "ssim": 0.70}, "residual": {"reidentified": 0.55, "ssim": 0.50},
            "third": {"reidentified": 0.55, "ssim": 0.60}}
    assert worst_case(rows) == "third"  # a tie in re-identification: the higher SSIM
    assert worst_case({k: rows[k] for k in ("small", "residual")}) == "residual"  # SSIM alone does not decide
    assert worst_case({"a": rows["residual"], "b": dict(rows["residual"])}) == "a"  # a full tie: the first named


def test_the_audit_refuses_a_decoder_it_does_not_know(in_process, tmp_path):
    code, out, err = in_process("audit", "--checkpoint", str(tmp_path), "--decoders", "small,huge")
    assert code == 2 and "--decoders: huge: not a decoder; choose among small,residual" in (out + err).splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# Enough images that the two decoders' rows differ, little enough to take seconds.
SMALL_AUDIT = ["--public", "64", "--private", "64", "--reidentify", "20", "--candidates", "5", "--decoder-epochs", "1",
               "--inversions", "1", "--inversion-steps", "1", "--unsplit", "1", "--unsplit-rounds", "1", "--hijack-steps", "0"]


def test_the_audit_reports_each_decoder_and_the_worst_case_per_cut(in_process, mnist_root, tmp_path, monkeypatch):
    """The private config (edges keep their weights), two steps: a row per decoder capacity, and
    the row ``decoder`` is the one of them that re-identifies most; a capacity's row is the same
    whether or not the others were trained (each its own seed), and so is a second audit."""
    monkeypatch.setenv("COLUMNS", "200")  # the table's rows on one line each
    tiny = {"topology.transport": "loopback", "train.max_steps": 2, "data.limit_train": 256, "data.limit_test": 64}
    code, out, err = in_process("--config", "configs/mnist_private.yaml",
                                *quick_overrides(mnist_root, tmp_path / "run", 1, **tiny))
    assert code == 0, (out + err)[-3000:]

    def audit(folder: str, *more: str) -> dict:
        code, out, err = in_process("audit", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--set",
                                    f"data.root={mnist_root}", "--out", str(tmp_path / folder), *SMALL_AUDIT, *more)
        assert code == 0 and "worst:" in out and "decoder[residual]" in out, (out + err)[-3000:]  # the table
        return json.loads((tmp_path / folder / "audit.json").read_text())

    report, given = audit("both"), " (given the edge weights)"
    (cut, rows), = report["cuts"].items()  # the private config's one cut from an edge to the central
    names = ("decoder", "decoder[small]", "decoder[residual]", "inversion")
    assert list(rows) == [f"{name}{given}" for name in names] + ["unsplit"]
    capacities = {kind: rows[f"decoder[{kind}]{given}"] for kind in ("small", "residual")}
    worst = rows[f"decoder{given}"]
    assert capacities["small"] != capacities["residual"]
    expected = max(capacities, key=lambda kind: (capacities[kind]["reidentified"], capacities[kind]["ssim"]))
    assert worst == {**capacities[expected], "worst_of": expected}
    budget = report["decoder_budget"]
    assert budget["public_images"] == 64 and budget["epochs"] == 1 and budget["capacities"] == ["small", "residual"]
    assert 2 * budget["parameters"]["small"][cut] < budget["parameters"]["residual"][cut]

    assert audit("again")["cuts"] == report["cuts"]
    alone = audit("residual", "--decoders", "residual")["cuts"][cut]
    assert alone[f"decoder[residual]{given}"] == capacities["residual"] and f"decoder[small]{given}" not in alone
    assert alone[f"decoder{given}"]["worst_of"] == "residual"


EDGES = {"privacy.edge_weights": "edges", "data.placement": "edge", "model.plan": U_PLAN, "data.limit_train": 4096,
         "train.epochs": 1, "checkpoint.every_steps": 20, "train.edge_sync_every": 10, "train.seed": 3}


@pytest.mark.slow
@pytest.mark.seconds(110)
def test_edge_held_weights_stay_on_the_edges_and_resume_exactly(in_process, mnist_root, tmp_path):
    """U-shaped, edge data, edge-held weights: nothing of an edge's data or weights reaches the
    central; each edge's parts are on its own disk; a killed edge resumes to the same end; the
    parts merge for export; and the audit's label attack beats chance (no label defence). The
    untouched run is the same config in one process; what crosses and what lands where is read
    from the killed torchrun job's. (With the adversary, its decoder kept in the edges' parts:
    test_adversary, in one process.)"""
    untouched = run(loopback_cmd(mnist_root, tmp_path / "a", 2, **EDGES))
    assert untouched.returncode == 0, untouched.stdout[-3000:]
    reference = json.loads((tmp_path / "a" / "summary.json").read_text())
    killed = run(torchrun_cmd(3, *quick_overrides(mnist_root, tmp_path / "b", edges=2, **EDGES), max_restarts=2),
                 env=child_env(SPLIT_TRAINER_FAULT="edge1:train:45:kill"))
    assert killed.returncode == 0, killed.stdout[-4000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["restarts"] == 1 and abs(summary["test_loss"] - reference["test_loss"]) < 1e-6

    for name, traffic in summary["bytes"]["per_edge"].items():
        for kind in ("inputs", "labels", "edge_state"):
            assert traffic["sent"][kind] == traffic["received"][kind] == 0, (name, kind)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in (checkpoints / "step_00000064").iterdir()) == ["central.pt", "manifest.json"]
    for edge in ("edge1", "edge2"):
        assert set(checkpoint.load(checkpoints / "edges" / edge / "step_00000064").parts) == {edge}
    assert not (tmp_path / "b" / "model.pt").exists()

    code, out, err = in_process("export", "--checkpoint", str(checkpoints), "--out", str(tmp_path / "model.pt"))
    assert code == 0, out + err
    state = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert {"conv1.weight", "fc1.weight", "fc2.weight"} <= set(state)

    code, out, err = in_process("audit", "--checkpoint", str(checkpoints), "--set", f"data.root={mnist_root}", "--out",
                                str(tmp_path / "audit"), *AUDIT)
    assert code == 0, (out + err)[-3000:]
    labels = json.loads((tmp_path / "audit" / "audit.json").read_text())["labels"]
    assert labels["from the returned gradients"]["accuracy"] > labels["chance"] + 0.3, labels


PRIVATE_REPLIES = {
    # Every call the central may make of an edge under configs/mnist_private.yaml, and what its reply
    # may carry back; a call not named here fails the test below.
    "about": "where the edge runs, its threads and device, its shard's sizes",
    "run": "the activation at the first cut, the gradient at the second, the batch's loss; evaluation's scores",
    "gather_average": "nothing (the edges fetch each other's replicas)",
    "apply_average": "nothing",
    "save_part": "the size and SHA-256 of the part the edge wrote to its own disk",
    "load_part": "nothing",
    "rss": "the edge process's resident bytes",
}
SHARD_SIZES = {"train", "test", "train_batches", "test_batches"}


def _leaves(obj):
    """Every leaf of a reply: tensors, numbers, strings, None."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _leaves(value)
    elif isinstance(obj, (list, tuple)):
        yield obj  # a list of numbers may be a label count
        for value in obj:
            yield from _leaves(value)
    else:
        yield obj


def _check_reply(method: str, reply, params: dict[str, torch.Tensor], label_counts: list[list[int]]) -> None:
    """No input, label, label count or edge parameter in ``reply``, whatever the call."""
    from split_trainer.transport.wire import Reply

    if method == "run":
        assert isinstance(reply, Reply) and reply.labels is None, reply
    elif method == "about":
        assert set(reply) == {"host", "threads", "device", "shard"} and set(reply["shard"]) == SHARD_SIZES, reply
    elif method == "save_part":
        assert set(reply) == {"bytes", "sha256"}, reply
    elif method == "rss":
        assert isinstance(reply, int)
    else:
        assert reply is None, (method, reply)
    shapes = {tuple(p.shape) for p in params.values()}
    for leaf in _leaves(reply):
        if isinstance(leaf, torch.Tensor):
            assert leaf.is_floating_point(), (method, leaf.dtype)  # labels are integers
            assert tuple(leaf.shape[1:]) != (1, 28, 28), (method, leaf.shape)  # an input batch
            assert tuple(leaf.shape) not in shapes, (method, leaf.shape)  # an edge parameter
        assert not (isinstance(leaf, (list, tuple)) and list(leaf) in label_counts), (method, leaf)


def test_the_private_config_sends_the_central_no_input_label_count_or_edge_parameter(in_process, mnist_root,
                                                                                    tmp_path, monkeypatch):
    """configs/mnist_private.yaml on loopback, trained, synchronised, checkpointed, evaluated and
    resumed: every reply an edge sends the central, whatever the call, is classified and checked
    against the edge's data, its parameters and its adversary's decoder."""
    from split_trainer.data.datasets import load
    from split_trainer.data.shards import Shard, _counts
    from split_trainer.transport import loopback

    calls = []

    class Recorded:
        """The central's handle on one edge: the real one, with every reply recorded as it arrives."""

        def __init__(self, remote):
            self.remote = remote

        def send(self, method, args, timeout_s, seq=None):
            pending, edge = self.remote.send(method, args, timeout_s, seq), self.remote.edge

            class Seen:
                def wait(self):
                    reply = pending.wait()
                    decoder = {f"decoder.{k}": v for k, v in edge.adversary.decoder.state_dict().items()}
                    calls.append((edge.name, method, reply, {**edge.stage.state_dict(), **decoder}))
                    return reply

                def on_failure(self, callback):
                    pending.on_failure(callback)
            return Seen()

    class RecordingLoopback(loopback.LoopbackTransport):
        def connect(self, names, cfg):
            return [Recorded(remote) for remote in super().connect(names, cfg)]

    monkeypatch.setattr(loopback, "LoopbackTransport", RecordingLoopback)
    keys = {"topology.transport": "loopback", "train.edge_sync_every": 4, "checkpoint.every_steps": 6,
            "privacy.adversary": 1.0}  # whether or not the config ships with it: its decoder must stay home
    received = 0
    for steps in (12, 18):  # the second run resumes from the first's checkpoint: load_part
        code, out, err = in_process("--config", "configs/mnist_private.yaml", *quick_overrides(
            mnist_root, tmp_path, 2, **keys, **{"train.max_steps": steps}))
        assert code == 0, (out + err)[-3000:]
        summary = json.loads((tmp_path / "summary.json").read_text())
        for traffic in summary["bytes"]["per_edge"].values():
            received += traffic["received_total"]
            for kind in ("inputs", "labels", "edge_state"):
                assert traffic["sent"][kind] == traffic["received"][kind] == 0, kind

    cfg = load_config(tmp_path / "config.yaml")
    train, test, spec = load(cfg.data)
    label_counts = []
    for k in (1, 2):
        shard = Shard.carve(train, test, k, 2, cfg.data, cfg.train.seed, spec.classes)
        label_counts += [_counts(shard.train.labels, spec.classes), _counts(shard.test.labels, spec.classes)]
    methods = {method for _, method, _, _ in calls}
    assert methods <= set(PRIVATE_REPLIES), f"calls the test does not classify: {methods - set(PRIVATE_REPLIES)}"
    assert {"about", "run", "gather_average", "save_part", "load_part"} <= methods, methods
    for _, method, reply, params in calls:
        _check_reply(method, reply, params, label_counts)
    from split_trainer.transport.wire import nbytes
    assert sum(nbytes(reply) for _, _, reply, _ in calls) == received  # the link counted what was recorded
    for _, method, reply, _ in calls:  # a control reply is a few numbers and names: no data rides on it
        assert method == "run" or len(pickle.dumps(reply)) < 1000, (method, reply)
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert set(partition["edge1"]) == SHARD_SIZES


def test_the_banner_says_its_epsilon_is_a_plan():
    from split_trainer.privacy.defences import banner

    line = banner(PrivacyConfig(clip=1.0, noise=1.5), 6)
    assert f"planned: epsilon {epsilon(PrivacyConfig(clip=1.0, noise=1.5), 6):.3g} at delta 1e-05 if each " \
           "training sample is released once an epoch for 6 epochs; the summary's epsilon counts the releases" in line


@pytest.mark.parametrize("served, reached, counted, after", [
    (5, 7, 2, 3),  # resumed inside pass 2, which the failed attempt had gone on in: batches 5, 6 go out twice in it
    (4, 7, 1, 2),  # resumed at pass 2's start: the failed attempt had begun it; redoing batch 4 counts it again
    (4, 4, 1, 1),  # the attempt before sent nothing past the checkpoint
    (9, 12, 3, 4)])  # ... inside pass 3, whose end the failed attempt reached
def test_a_resumed_run_counts_the_releases_the_attempt_before_made_past_its_checkpoint(tmp_path, served, reached,
                                                                                      counted, after):
    """One edge of 4 batches a pass, checkpoint at step 10 with ``served`` batches and ``counted``
    releases; the failed attempt's ledger: it may have reached ``reached`` batches by step 20."""
    from split_trainer.privacy.defences import LEDGER, Releases

    ledger = Releases({"edge1": counted}, tmp_path / LEDGER)
    ledger.before_span(20, {"edge1": (served, 4)}, {"edge1": reached - served})
    counts = {"edge1": counted}
    Releases(counts, tmp_path / LEDGER).start(10, {"edge1": (served, 4)}, {"edge1": served}, resumed=True)
    assert counts == {"edge1": after}
    fresh = {}
    Releases(fresh, tmp_path / LEDGER).start(0, {"edge1": (0, 4)}, {}, resumed=False)  # a new run ignores it
    assert fresh == {"edge1": 0}
    old = {}  # a checkpoint from before the count was kept, and no ledger: the passes its served batches began
    Releases(old, tmp_path / "absent.json").start(10, {"edge1": (served, 4)}, {"edge1": served}, resumed=True)
    assert old == {"edge1": -(-served // 4)}
