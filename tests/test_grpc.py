"""The grpc transport (issue 36, in progress), in one process: the central's server and the edges
on threads, over 127.0.0.1 with real mutual TLS. A run on it is the loopback run; who may attach
is who the job's certificates say; a message that does not decode drops its sender."""

from __future__ import annotations

import dataclasses
import json
import queue
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from split_trainer.cli import certs as certs_command
from split_trainer.config import ConfigError, load_config
from split_trainer.core.errors import JobError
from split_trainer.training.hosting import EdgeHost
from split_trainer.transport import identity, sealing
from split_trainer.transport.codec import Hello, decode_call, encode
from split_trainer.transport.grpc_central import GrpcTransport
from split_trainer.transport.grpc_common import CERTS_FOLDER, PATH
from split_trainer.transport.grpc_edge import serve_edge_grpc, serve_edge_in_run_folder
from split_trainer.transport.link import Link
from split_trainer.transport.wire import WireFormat

from conftest import ROOT, THREADS, child_env, quick_overrides, run, torchrun_cmd

EXACT = {"train.threads": THREADS, "train.optimizer": "sgd", "train.momentum": 0.0, "train.lr": 0.05,
         "model.dropout": "false", "train.max_steps": 12, "train.seed": 5}
JOIN_S = 60


class _Thread(threading.Thread):
    """A thread that keeps what its target raised."""

    def __init__(self, target: Callable[[], Any], name: str):
        super().__init__(name=name, daemon=True)
        self.work, self.error = target, None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:
            self.error = exc


def _started(target: Callable[[], Any], name: str) -> _Thread:
    thread = _Thread(target, name)
    thread.start()
    return thread


def _joined(threads: list[_Thread]) -> None:
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), f"{thread.name} still running"
        assert thread.error is None, f"{thread.name}: {thread.error!r}"


def _grpc_run(in_process: Callable, mnist_root: Path, run_dir: Path, **keys: Any) -> dict:
    """A quick 2-edge run on grpc: the central in this process (``main``), each edge on a thread
    that dials it; its summary."""
    argv = quick_overrides(mnist_root, run_dir, 2, **{"topology.transport": "grpc", "rpc.startup_timeout_s": 30},
                           **keys)
    cfg = load_config(None, argv[1:])
    edges = [_started(lambda k=k: serve_edge_in_run_folder(run_dir, f"edge{k}", EdgeHost(cfg, [k]), cfg),
                      f"edge{k}") for k in (1, 2)]
    try:
        code, out, err = in_process(*argv)
    finally:
        _joined(edges)
    assert code == 0, (out + err)[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_a_grpc_run_is_the_loopback_run(loopback, in_process, mnist_root, tmp_path):
    """2 edges, relay engine, no dropout: the same loss, every tensor of model.pt and the same wire
    bytes as the loopback run, bit for bit, with each edge on a thread that dials the central."""
    on_loopback = loopback(tmp_path / "loopback", 2, **EXACT)
    run_dir = tmp_path / "grpc"
    on_grpc = _grpc_run(in_process, mnist_root, run_dir, **EXACT)
    assert on_grpc["test_loss"] == on_loopback["test_loss"]
    assert on_grpc["bytes"] == on_loopback["bytes"]
    a = torch.load(tmp_path / "loopback" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _FakeEdge:
    """A Served that answers rss and finish, and fails every other call."""

    def __init__(self, name: str):
        self.name, self.last_seen = name, 0.0

    def serve(self, method: str, args: tuple, seq: Optional[int] = None) -> Any:
        if method == "rss":
            return 7
        if method == "finish":
            return None
        raise RuntimeError(f"{self.name} cannot {method}")

    def finish(self) -> None:
        pass


class _FakeHost:
    def build(self, name: str, cfg: Any, peers: Any, autograd: Any, guard: Any = None) -> _FakeEdge:
        return _FakeEdge(name)


def _cfg(run_dir: Path, **keys: Any):
    base = {"topology.transport": "grpc", "topology.edges": 2, "rpc.timeout_s": 10, "rpc.startup_timeout_s": 10,
            "output.run_dir": run_dir, **keys}
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_only_the_jobs_edges_attach_and_the_first_edge1_stays(tmp_path, capsys):
    """Refused, and the job goes on: a second edge1 and an edge3 of the same CA outside
    topology.edges=2 (one line each on the central, and on the client), and an edge1 of another
    job's CA (the TLS handshake fails: one line on the client, gRPC's own on the central)."""
    cfg = _cfg(tmp_path)
    transport = GrpcTransport(cfg)
    transport.start()
    edges = [_started(lambda name=name: serve_edge_in_run_folder(tmp_path, name, _FakeHost(), cfg), name)
             for name in ("edge1", "edge2")]
    try:
        assert transport.members() == ["edge1", "edge2"]
        certs = tmp_path / CERTS_FOLDER
        identity.make_job(certs, ["edge3"])
        identity.make_job(tmp_path / "other", ["edge1"])
        address = lambda: transport.address
        with pytest.raises(ConfigError, match=r"second connection for edge1 .* \(the first connection stays\)"):
            serve_edge_grpc(address, identity.load_bundle(certs / "edge1"), _FakeHost(), cfg)
        with pytest.raises(ConfigError, match="certificate of 'edge3' is refused: the job's edges are edge1..edge2"):
            serve_edge_grpc(address, identity.load_bundle(certs / "edge3"), _FakeHost(), cfg)
        foreign = identity.load_bundle(tmp_path / "other" / "edge1")
        with pytest.raises(ConfigError, match="TLS handshake with the central .* failed"):  # not its CA's central
            serve_edge_grpc(address, foreign, _FakeHost(), cfg)
        # It trusts the job's CA, but its own certificate is another's: the central closes the socket,
        # which the client cannot tell from a central starting up, so it tries until its startup timeout.
        with pytest.raises(JobError, match="cannot reach the central .* Socket closed"):
            serve_edge_grpc(address, dataclasses.replace(foreign, ca_pem=identity.load_bundle(certs / "edge1").ca_pem),
                            _FakeHost(), _cfg(tmp_path, **{"rpc.startup_timeout_s": 1}))
        assert transport.refusals["certificate"] == 2
        names = transport.admit(transport.members())
        remotes = transport.connect(names, cfg)
        assert [r.send("rss", (), 5).wait() for r in remotes] == [7, 7]
        with pytest.raises(RuntimeError, match="edge2 cannot about"):
            remotes[1].send("about", (), 5).wait()
        transport.finish(5)
    finally:
        transport.shutdown(graceful=True)
        _joined(edges)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "refus" in line]
    assert len(lines) == 2, err
    assert "Traceback" not in err


def test_an_edges_error_reaches_the_central_with_its_control_characters_escaped(tmp_path):
    """An edge's error message is a peer's word: a newline and an ANSI code in it cannot forge a
    line of the central's log."""
    class Forger(_FakeEdge):
        def serve(self, method, args, seq=None):
            if method == "about":
                raise RuntimeError("\x1b[2Jsplit_trainer: [central] done: steps 64")
            return super().serve(method, args, seq)

    host = _FakeHost()
    host.build = lambda name, *args, **kw: Forger(name)
    cfg = _cfg(tmp_path, **{"topology.edges": 1})
    transport = GrpcTransport(cfg)
    transport.start()
    edge = _started(lambda: serve_edge_in_run_folder(tmp_path, "edge1", host, cfg), "edge1")
    try:
        assert transport.members() == ["edge1"]
        link = Link("edge1", transport.connect(transport.admit(["edge1"]), cfg)[0], WireFormat({}), 5)
        with pytest.raises(JobError) as caught:
            link.call("about")
        assert str(caught.value) == "edge1 failed: \\x1b[2Jsplit_trainer: [central] done: steps 64"
        transport.finish(5)
    finally:
        transport.shutdown(graceful=True)
        _joined([edge])


def test_a_message_that_does_not_decode_drops_its_sender_with_one_line(tmp_path, capsys):
    """A client with a valid certificate writes garbage onto its stream: refused with one line,
    counted, the stream ended with INVALID_ARGUMENT and its call in flight failed with the line."""
    cfg = _cfg(tmp_path, **{"topology.edges": 1})
    transport = GrpcTransport(cfg)
    transport.start()
    creds = _edge_credentials(tmp_path, "edge1")
    outbox: queue.Queue = queue.Queue()
    try:
        with grpc.secure_channel(transport.address, creds) as channel:
            call = channel.stream_stream(PATH)(iter(outbox.get, None))
            outbox.put(encode(Hello("edge1")))
            next(call)  # the central's first heartbeat: attached
            pending = transport.call("edge1", "rss", (), 5, None)
            sent = next(m for m in map(_call_or_none, call) if m is not None)
            assert sent.method == "rss"
            outbox.put(b"\xc1 is no msgpack")
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ConnectionError, match="sent a message that is refused"):
            pending.wait()
        assert transport.refusals["message"] == 1
    finally:
        outbox.put(None)  # the client's request stream ends
        transport.shutdown(graceful=False)
    err = capsys.readouterr().err
    refused = [line for line in err.splitlines() if "refused" in line]
    assert len(refused) == 1 and "does not decode" in refused[0], err
    assert "Traceback" not in err


def _call_or_none(data: bytes):
    try:
        return decode_call(data)
    except Exception:  # a heartbeat
        return None


def test_a_revoked_certificate_and_a_client_without_one_are_refused_before_the_job(tmp_path, capsys):
    """edge2's certificate revoked with the certs command while the central runs: refused at its
    next connection, one line on each side, nothing of the job sent; a client that presents no
    certificate fails the TLS handshake. edge1 attaches and finishes."""
    cfg = _cfg(tmp_path, **{"rpc.startup_timeout_s": 3, "topology.min_edges": 1})
    transport = GrpcTransport(cfg)
    transport.start()
    certs = tmp_path / CERTS_FOLDER
    assert certs_command.main(["certs", "--out", str(certs), "--revoke", "edge2"]) == 0
    assert "revoked edge2" in capsys.readouterr().out
    edge1 = _started(lambda: serve_edge_in_run_folder(tmp_path, "edge1", _FakeHost(), cfg), "edge1")
    try:
        heard: list[bytes] = []
        host = _FakeHost()
        host.build = lambda *args, **kw: heard.append(b"connect")  # nothing of the job may reach a refused edge
        with pytest.raises(ConfigError, match=r"certificate of 'edge2' is refused: that certificate .* is revoked"):
            serve_edge_grpc(lambda: transport.address, identity.load_bundle(certs / "edge2"), host, cfg)
        anonymous = grpc.ssl_channel_credentials(root_certificates=identity.load_bundle(certs / "edge1").ca_pem)
        with grpc.secure_channel(transport.address, anonymous) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                heard.extend(channel.stream_stream(PATH)(iter([encode(Hello("edge1"))]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and heard == []
        assert transport.members() == ["edge1"] and transport.refusals["certificate"] == 1
        transport.finish(5)
    finally:
        transport.shutdown(graceful=True)
        _joined([edge1])
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "is revoked" in line]) == 1 and "Traceback" not in err


def test_what_grpc_does_not_carry_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="train.engine=autograd needs"):
        _cfg(tmp_path, **{"train.engine": "autograd"})


def test_replicas_go_edge_to_edge_sealed_and_average_as_on_loopback(loopback, in_process, mnist_root, tmp_path,
                                                                     monkeypatch):
    """privacy.edge_weights=edges: each replica leaves its edge sealed with the edges' key, which
    the central's bundle does not hold; the central passes on exactly the sealed bytes, which open
    only with that key and for that sender, receiver and nonce; the run is the loopback run."""
    keys = {**EXACT, "privacy.edge_weights": "edges", "train.edge_sync_every": 4}
    on_loopback = loopback(tmp_path / "loopback", 2, **keys)
    sealed, passed = [], []
    seal, pass_on = sealing.seal, GrpcTransport._pass_on
    monkeypatch.setattr(sealing, "seal", lambda key, plain, context: sealed.append(
        (key, plain, context, seal(key, plain, context))) or sealed[-1][3])
    monkeypatch.setattr(GrpcTransport, "_pass_on", lambda self, sender, message: (
        passed.append(message.blob), pass_on(self, sender, message))[1])
    run_dir = tmp_path / "grpc"
    on_grpc = _grpc_run(in_process, mnist_root, run_dir, **keys)
    assert on_grpc["test_loss"] == on_loopback["test_loss"] and on_grpc["bytes"] == on_loopback["bytes"]
    assert len(sealed) == len(passed) == 2 * 3  # 12 steps, a sync every 4: each edge fetches the other's, 3 times
    assert identity.load_bundle(run_dir / CERTS_FOLDER / "central").edges_key is None
    other = bytes(32)
    for key, plain, context, blob in sealed:
        assert blob in passed and plain[-64:] not in blob
        assert sealing.unseal(key, blob, context) == plain
        with pytest.raises(sealing.SealError):
            sealing.unseal(other, blob, context)
        with pytest.raises(sealing.SealError):  # replayed for another receiver or nonce
            sealing.unseal(key, blob, context[:-1] + bytes([context[-1] ^ 1]))


@pytest.mark.slow
@pytest.mark.seconds(60)
def test_a_torchrun_job_on_grpc_survives_a_killed_edge_like_an_untouched_run(loopback, mnist_root, tmp_path):
    """The README's form with one override (rank 0 serves, the edge ranks dial it), under
    --max-restarts 1 with edge2 killed at its 7th batch: torchrun restarts every rank, the new
    central serves on a new port, the edges find it, and the job resumes from step 10 and ends where
    an untouched run ends (1e-6)."""
    keys = {"train.max_steps": 20, "checkpoint.every_steps": 10}
    untouched = loopback(tmp_path / "untouched", 2, "--config", "configs/mnist.yaml", **keys)
    run_dir = tmp_path / "grpc"
    result = run(torchrun_cmd(3, "--config", "configs/mnist.yaml", *quick_overrides(
        mnist_root, run_dir, edges=2, **{"topology.transport": "grpc", **keys}), max_restarts=1),
        env=child_env(SPLIT_TRAINER_FAULT="edge2:train:7:kill"))
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["restarts"] == 1 and summary["resumed_from_step"] == 10
    assert abs(summary["test_loss"] - untouched["test_loss"]) < 1e-6
    a, b = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (tmp_path / "untouched", run_dir))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_an_edge_rank_dials_only_the_address_of_its_own_attempt(tmp_path, monkeypatch):
    """In a torchrun group the run folder's grpc.address can still name the last attempt's dead
    port: an edge rank takes the address this attempt's central put in torchrun's store (a real
    TCPStore, as torchrun's agent holds it), and waits for it, bounded, when it is not there yet."""
    from datetime import timedelta

    import torch.distributed as dist

    from split_trainer.transport.grpc_common import central_address, read_address, write_address
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(agent.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    write_address(tmp_path, "127.0.0.1:1111", 10)  # attempt 0's central
    assert central_address(tmp_path, 10)() == "127.0.0.1:1111"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # its edge was killed: the group starts again
    assert read_address(tmp_path, 1) == "127.0.0.1:1111"  # the file still names the dead port
    with pytest.raises(ConfigError, match="this attempt's central announced no address within"):
        central_address(tmp_path, 0.5)
    write_address(tmp_path, "127.0.0.1:2222", 10)  # attempt 1's central
    assert central_address(tmp_path, 10)() == "127.0.0.1:2222"
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # without torchrun: the file, as before
    assert central_address(tmp_path, 1)() == "127.0.0.1:2222"


def test_a_silent_edge_is_dropped_within_the_timeout_with_one_line(tmp_path, capsys):
    """An edge that attaches and then sends nothing, not even its heartbeat (a frozen process):
    the central drops it after rpc.timeout_s, and its call in flight fails with the line."""
    cfg = _cfg(tmp_path, **{"topology.edges": 1, "rpc.timeout_s": 1})
    transport = GrpcTransport(cfg)
    transport.start()
    creds = _edge_credentials(tmp_path, "edge1")
    outbox: queue.Queue = queue.Queue()
    try:
        with grpc.secure_channel(transport.address, creds) as channel:
            call = channel.stream_stream(PATH)(iter(outbox.get, None))
            outbox.put(encode(Hello("edge1")))
            next(call)
            pending = transport.call("edge1", "rss", (), 30, None)
            silent = r"edge1 .* fell silent: no message for \d+ s \(rpc.timeout_s=1\)"
            with pytest.raises(ConnectionError, match=silent):
                pending.wait()
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        outbox.put(None)
        transport.shutdown(graceful=False)
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "fell silent" in line]) == 1, err


def test_an_edge_ends_with_one_line_when_the_central_falls_silent(tmp_path):
    """A server of the job's certificates that accepts the stream and then says nothing: the edge
    gives up after rpc.startup_timeout_s (before its edge is built; rpc.timeout_s after)."""
    identity.make_job(tmp_path / CERTS_FOLDER, ["edge1"])
    central = identity.load_bundle(tmp_path / CERTS_FOLDER / "central")
    quiet = threading.Event()

    def attach(requests, context):
        quiet.wait(10)  # holds the stream open, silent
        return iter(())

    server, port = _fake_central(central, attach)
    try:
        cfg = _cfg(tmp_path, **{"topology.edges": 1, "rpc.startup_timeout_s": 1})
        with pytest.raises(JobError, match=r"no message from the central for \d+ s \(rpc.startup_timeout_s=1\)"):
            serve_edge_grpc(lambda: f"127.0.0.1:{port}", identity.load_bundle(tmp_path / CERTS_FOLDER / "edge1"),
                            _FakeHost(), cfg)
    finally:
        quiet.set()
        server.stop(0).wait(5)


@pytest.mark.parametrize("min_edges", [None, 1])
def test_the_central_waits_for_its_edges_within_the_startup_timeout(tmp_path, min_edges):
    """Only edge1 of 2 dials in: a fixed fleet stops with one line after rpc.startup_timeout_s, an
    elastic one (topology.min_edges=1) goes on with edge1."""
    cfg = _cfg(tmp_path, **{"rpc.startup_timeout_s": 1, "topology.min_edges": "null" if min_edges is None else 1})
    transport = GrpcTransport(cfg)
    transport.start()
    edge = _started(lambda: serve_edge_in_run_folder(tmp_path, "edge1", _FakeHost(), cfg), "edge1")
    try:
        if min_edges is None:
            with pytest.raises(JobError, match=r"^edge2 did not dial in within rpc.startup_timeout_s=1 s \(1 of 2"):
                transport.members()
        else:
            assert transport.admit(transport.members()) == ["edge1"]
            transport.connect(["edge1"], cfg)
        transport.finish(5)
    finally:
        transport.shutdown(graceful=True)
        _joined([edge])


def _edge_credentials(run_dir: Path, name: str) -> grpc.ChannelCredentials:
    """What edge ``name`` dials with: its bundle from the run folder's certificates."""
    bundle = identity.load_bundle(run_dir / CERTS_FOLDER / name)
    return grpc.ssl_channel_credentials(root_certificates=bundle.ca_pem, private_key=bundle.key_pem,
                                        certificate_chain=bundle.cert_pem)


def _fake_central(bundle: identity.Bundle, attach: Callable) -> tuple[grpc.Server, int]:
    """A server of the job's central certificate whose one method is ``attach``."""
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "split_trainer.Fleet", {"Attach": grpc.stream_stream_rpc_method_handler(attach)}),))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(bundle.key_pem, bundle.cert_pem)], root_certificates=bundle.ca_pem, require_client_auth=True))
    server.start()
    return server, port


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(max_size=200))
def test_random_bytes_from_the_central_end_an_edge_with_one_line(tmp_path_factory, garbage):
    """Whatever the central sends that does not decode, the edge refuses with one line and ends:
    no traceback, no hang."""
    certs = tmp_path_factory.mktemp("certs")
    identity.make_job(certs, ["edge1"])
    server, port = _fake_central(identity.load_bundle(certs / "central"), lambda requests, context: iter([garbage]))
    try:
        with pytest.raises((JobError, ConfigError)) as ended:
            serve_edge_grpc(lambda: f"127.0.0.1:{port}", identity.load_bundle(certs / "edge1"), _FakeHost(),
                            _cfg(certs, **{"rpc.startup_timeout_s": 2}))
        assert "\n" not in str(ended.value)
        assert "refused" in str(ended.value) or "ended the stream" in str(ended.value)
    finally:
        server.stop(0).wait(5)


@pytest.fixture(scope="module")
def one_edge_central(tmp_path_factory):
    """A central of one edge, up for the module's tests: (transport, edge1's credentials)."""
    run_dir = tmp_path_factory.mktemp("central")
    transport = GrpcTransport(_cfg(run_dir, **{"topology.edges": 1}))
    transport.start()
    yield transport, _edge_credentials(run_dir, "edge1")
    transport.shutdown(graceful=False)


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(garbage=st.binary(max_size=200))
def test_random_bytes_from_an_edge_drop_it_with_one_line(one_edge_central, garbage):
    """After its hello, whatever an edge sends that does not decode is refused, counted and ends
    its stream with INVALID_ARGUMENT: no traceback, no hang."""
    transport, creds = one_edge_central
    before = transport.refusals["message"]
    with grpc.secure_channel(transport.address, creds) as channel:
        call = channel.stream_stream(PATH)(iter([encode(Hello("edge1")), garbage]))
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                pass
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in ended.value.details() and "refused" in ended.value.details()
    assert transport.refusals["message"] == before + 1


@pytest.mark.parametrize("ending, runs, code", [("exit 1", 1, 1), ("exit 2", 1, 2), ("kill -TERM $$", 1, 143),
                                                ("kill -9 $$", 3, 137), ("[ $n -lt 2 ] && kill -9 $$; exit 0", 2, 0)])
def test_the_grpc_launch_scripts_start_only_a_killed_process_again(tmp_path, ending, runs, code):
    """launch/supervise.sh (under grpc_central.sh and grpc_edge.sh), with 2 restarts: a process
    killed (SIGKILL: exit 137) runs again; an error it reported, SIGTERM or Ctrl-C do not."""
    count = tmp_path / "runs"
    script = f"echo run >> {count}; n=$(wc -l < {count}); {ending}"
    done = subprocess.run(["bash", str(ROOT / "launch" / "supervise.sh"), "test", "bash", "-c", script, "--restarts", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == code and count.read_text().count("run") == runs, done.stderr
    assert done.stderr.count("test: the process was killed") == min(runs - 1, 2)
