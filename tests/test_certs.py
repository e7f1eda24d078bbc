"""Identity by certificate for the grpc transport (issue 36) and the edges' sealed replicas: the
files ``certs`` writes, what ``load_bundle`` refuses, real mutual-TLS handshakes with grpcio in
this process (who gets in, who is refused before the handler runs), AES-GCM sealing, and the
command's one-line refusals. Real cryptography and real sockets throughout; EC P-256 keys keep it
fast."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import stat
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store
from hypothesis import given, settings, strategies as st

from split_trainer.core.errors import ConfigError, JobError
from split_trainer.transport import identity
from split_trainer.transport.identity import load_bundle, make_job, name_of
from split_trainer.transport.sealing import SealError, seal, unseal

EDGE_FILES = {"ca.pem", "cert.pem", "key.pem", "edges.key"}
METHOD = "/split_trainer.Probe/Echo"
TIMEOUT = 5  # seconds: every call and wait is bounded, so a refusal cannot hang the suite
NOW = dt.datetime.now(dt.timezone.utc)


def files_of(out: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in out.iterdir()}


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two jobs, made once: this one (3 edges) and another (1 edge), whose certificates this one's
    hosts must refuse."""
    folder = tmp_path_factory.mktemp("jobs")
    make_job(folder / "job", ["edge1", "edge2", "edge3"], [], 30)
    make_job(folder / "other", ["edge1"], [], 30)
    return folder / "job", folder / "other"


@pytest.fixture
def job(made: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the job for one test to change (copytree keeps the modes)."""
    return Path(shutil.copytree(made[0], tmp_path / "job"))


@pytest.fixture
def other(made: tuple[Path, Path]) -> Path:
    return made[1]


# --- the files -------------------------------------------------------------------------------------


def test_the_layout_modes_and_who_holds_the_edges_key(made: tuple[Path, Path]):
    job = made[0]  # as make_job left it, not a copy
    assert files_of(job) == {"ca": {"ca.pem", "ca.key", "edges.key"}, "central": {"ca.pem", "cert.pem", "key.pem"},
                             "edge1": EDGE_FILES, "edge2": EDGE_FILES, "edge3": EDGE_FILES}
    assert stat.S_IMODE(job.stat().st_mode) == 0o700
    for path in job.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert sorted(p.name for p in job.parent.iterdir()) == ["job", "other"]  # no staging folder left behind
    central = load_bundle(job / "central")
    assert central.name == "central" and central.edges_key is None
    key = (job / "ca" / "edges.key").read_bytes()
    for name in ("edge1", "edge2", "edge3"):
        edge = load_bundle(job / name)
        assert edge.name == name == name_of(edge.cert_pem)
        assert edge.edges_key == bytes.fromhex(key.decode()) and len(edge.edges_key) == 32
        assert edge.ca_pem == central.ca_pem == (job / "ca" / "ca.pem").read_bytes()


def test_every_leaf_verifies_against_its_ca_in_its_role(job: Path):
    """Checked here with cryptography's own verifier, apart from load_bundle: the central as a
    server under each of its default names, each edge as a client named by its URI SAN."""
    ca = x509.load_pem_x509_certificate((job / "ca" / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    store = PolicyBuilder().store(Store([ca]))
    central = x509.load_pem_x509_certificate((job / "central" / "cert.pem").read_bytes())
    for subject in (DNSName("localhost"), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        assert store.build_server_verifier(subject).verify(central, [])[0] == central
    for name in ("edge1", "edge2", "edge3"):
        cert = x509.load_pem_x509_certificate((job / name / "cert.pem").read_bytes())
        verified = store.build_client_verifier().verify(cert, [])
        assert verified.subjects == [x509.UniformResourceIdentifier(f"split-trainer:{name}")]


def test_central_hosts_are_dns_names_or_ip_addresses(tmp_path: Path):
    issued = make_job(tmp_path / "job", ["edge1"], ["central.example.org", "10.8.0.1", "::1"], 1)
    assert issued.central_hosts == ["central.example.org", "10.8.0.1", "::1"]
    cert = x509.load_pem_x509_certificate((tmp_path / "job" / "central" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["central.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.8.0.1", "::1"]


def test_a_second_run_adds_what_is_missing_with_the_same_ca_and_never_overwrites(job: Path):
    before = snapshot(job)
    issued = make_job(job, ["edge4"], [], 30)
    assert not issued.made_ca and issued.names == ["edge4"]
    after = snapshot(job)
    assert {k: after[k] for k in before} == before  # nothing that was there changed
    assert after["edge4/ca.pem"] == before["ca/ca.pem"] and after["edge4/edges.key"] == before["ca/edges.key"]
    assert load_bundle(job / "edge4").name == "edge4"
    with pytest.raises(ConfigError) as refused:
        make_job(job, ["edge5", "edge2"], [], 30)
    assert f"{job / 'edge2' / 'cert.pem'} exists" in one_line(refused) and "--edges edge5" in str(refused.value)
    assert not (job / "edge5").exists()  # refused before anything was issued
    with pytest.raises(ConfigError) as refused:
        make_job(job, [], ["central.example.org"], 30)
    assert f"{job / 'central' / 'cert.pem'} exists" in one_line(refused)
    with pytest.raises(ConfigError) as refused:
        make_job(job, [], [], 30)
    assert "already holds the central's bundle" in one_line(refused)
    # renewal: the folder moved aside, the same command issues it again under the same CA
    shutil.move(job / "central", job.parent / "old-central")
    assert make_job(job, [], ["localhost"], 30).names == ["central"]
    assert load_bundle(job / "central").ca_pem == before["ca/ca.pem"]
    assert snapshot(job)["ca/ca.key"] == before["ca/ca.key"]


def test_a_folder_that_is_not_a_job_is_refused(tmp_path: Path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as refused:
        make_job(tmp_path / "busy", ["edge1"], [], 1)
    assert "holds no job's CA" in one_line(refused)
    (tmp_path / "empty").mkdir()
    make_job(tmp_path / "empty", ["edge1"], [], 1)  # an empty folder becomes the job
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o700


# --- load_bundle's refusals --------------------------------------------------------------------------


def refusal(folder: Path, now: dt.datetime | None = None) -> str:
    with pytest.raises(ConfigError) as refused:
        load_bundle(folder, now=now)
    return one_line(refused)


def test_load_bundle_refuses_a_bundle_that_tls_would_refuse(job: Path, other: Path):
    edge1 = job / "edge1"
    assert refusal(edge1, NOW + dt.timedelta(days=31)).startswith(f"{edge1 / 'ca.pem'} expired on")
    assert refusal(edge1, NOW - dt.timedelta(days=1)).startswith(f"{edge1 / 'ca.pem'} is not valid before")
    shutil.copy(other / "edge1" / "cert.pem", edge1 / "cert.pem")
    shutil.copy(other / "edge1" / "key.pem", edge1 / "key.pem")
    assert "is not signed by this bundle's CA" in refusal(edge1)
    shutil.copy(job / "edge2" / "cert.pem", edge1 / "cert.pem")
    assert refusal(edge1) == f"{edge1 / 'key.pem'} is not the key of {edge1 / 'cert.pem'}"
    shutil.copy(job / "edge2" / "key.pem", edge1 / "key.pem")
    assert load_bundle(edge1).name == "edge2"  # the name is the certificate's, not the folder's
    os.chmod(edge1 / "key.pem", 0o640)
    assert refusal(edge1) == f"{edge1 / 'key.pem'} can be read by others (mode 640): chmod 600 {edge1 / 'key.pem'}"
    os.chmod(edge1 / "key.pem", 0o600)
    (edge1 / "edges.key").write_text("not a key\n")
    os.chmod(edge1 / "edges.key", 0o600)
    assert "is not an edges key" in refusal(edge1)
    (edge1 / "cert.pem").write_text("hello\n")
    assert refusal(edge1) == f"{edge1 / 'cert.pem'} is not a PEM certificate"
    (edge1 / "cert.pem").unlink()
    assert refusal(edge1) == (f"{edge1 / 'cert.pem'} is missing (certs makes the job's files: "
                              f"python -m split_trainer certs --out DIR --edges N)")
    shutil.copy(job / "edge2" / "edges.key", job / "central" / "edges.key")
    assert "is in the central's bundle: remove it" in refusal(job / "central")


def test_an_expired_leaf_under_a_valid_ca_is_refused(job: Path):
    make_job(job, ["edge9"], [], 1, now=NOW - dt.timedelta(days=10))
    assert refusal(job / "edge9").startswith(f"{job / 'edge9' / 'cert.pem'} expired on")


# --- mutual TLS with grpcio ------------------------------------------------------------------------


@contextlib.contextmanager
def central_server(bundle: identity.Bundle) -> Iterator[tuple[int, list]]:
    """A gRPC server with the central's bundle, requiring a client certificate from the job's CA;
    its one method records the peer's name (``peer_name``) and echoes. Yields (port, names seen)."""
    seen: list = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(identity.peer_name(context))
        return request

    handler = grpc.method_handlers_generic_handler(
        "split_trainer.Probe", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})  # raw bytes both ways
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials([(bundle.key_pem, bundle.cert_pem)],
                                              root_certificates=bundle.ca_pem, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, seen
    finally:
        server.stop(grace=None)


def echo_call(port: int, ca: bytes, key: bytes | None, cert: bytes | None, host: str = "127.0.0.1") -> bytes:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
        return channel.unary_unary(METHOD)(b"ping", timeout=TIMEOUT)


def test_mutual_tls_lets_the_jobs_edges_in_and_names_them_by_their_certificate(job: Path):
    central = load_bundle(job / "central")
    with central_server(central) as (port, seen):
        for name, host in (("edge1", "127.0.0.1"), ("edge2", "localhost")):  # both of the central's names
            edge = load_bundle(job / name)
            credentials = grpc.ssl_channel_credentials(edge.ca_pem, edge.key_pem, edge.cert_pem)
            with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
                grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
                assert channel.unary_unary(METHOD)(b"ping", timeout=TIMEOUT) == b"ping"
        assert seen == ["edge1", "edge2"]


def _no_certificate(job, other):
    return job / "central" / "ca.pem", None, None


def _another_jobs_edge(job, other):
    return job / "central" / "ca.pem", other / "edge1" / "key.pem", other / "edge1" / "cert.pem"


def _expired_edge(job, other):
    make_job(job, ["edge9"], [], 1, now=NOW - dt.timedelta(days=10))
    return job / "ca" / "ca.pem", job / "edge9" / "key.pem", job / "edge9" / "cert.pem"


def _distrusts_the_central(job, other):  # a real edge of the job, trusting another job's CA
    return other / "ca" / "ca.pem", job / "edge1" / "key.pem", job / "edge1" / "cert.pem"


def _the_central_as_a_client(job, other):  # a server certificate is not a client one (its EKU)
    return job / "ca" / "ca.pem", job / "central" / "key.pem", job / "central" / "cert.pem"


@pytest.mark.parametrize("client", [_no_certificate, _another_jobs_edge, _expired_edge, _distrusts_the_central,
                                    _the_central_as_a_client])
def test_a_client_the_job_does_not_admit_is_refused_before_the_handler(job: Path, other: Path, client):
    ca, key, cert = (path.read_bytes() if path else None for path in client(job, other))
    with central_server(load_bundle(job / "central")) as (port, seen):
        with pytest.raises(grpc.RpcError) as refused:
            echo_call(port, ca, key, cert)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert seen == []  # the handshake failed: the handler never ran


# --- sealing ---------------------------------------------------------------------------------------


KEY = bytes(range(32))
CONTEXT = b"job=split_trainer sender=edge1 step=40"


def opens_not(key: bytes, blob: bytes, context: bytes) -> str:
    with pytest.raises(SealError) as refused:
        unseal(key, blob, context)
    assert isinstance(refused.value, JobError)
    return one_line(refused)


def test_a_sealed_blob_opens_only_with_its_key_its_context_and_every_byte():
    blob = seal(KEY, b"edge weights", CONTEXT)
    assert unseal(KEY, blob, CONTEXT) == b"edge weights"
    assert seal(KEY, b"edge weights", CONTEXT) != blob  # a fresh nonce every time
    assert len(blob) == 12 + len(b"edge weights") + 16
    assert "does not open" in opens_not(bytes(32), blob, CONTEXT)
    assert "does not open" in opens_not(KEY, blob, b"job=split_trainer sender=edge2 step=40")
    for at in (0, 12, len(blob) - 1):  # the nonce, the ciphertext, the tag
        flipped = bytearray(blob)
        flipped[at] ^= 1
        assert "does not open" in opens_not(KEY, bytes(flipped), CONTEXT)
    assert "does not open" in opens_not(KEY, blob[:-1], CONTEXT)
    assert "cut short" in opens_not(KEY, blob[:20], CONTEXT)
    with pytest.raises(ConfigError, match="the edges key has 16 bytes"):
        seal(KEY[:16], b"x", CONTEXT)


@settings(max_examples=20, deadline=None, database=None)  # no .hypothesis folder in the checkout
@given(plaintext=st.binary(max_size=512), context=st.binary(max_size=64), other=st.binary(max_size=64))
def test_seal_round_trips_and_binds_its_context(plaintext: bytes, context: bytes, other: bytes):
    blob = seal(KEY, plaintext, context)
    assert unseal(KEY, blob, context) == plaintext
    if other != context:
        with pytest.raises(SealError):
            unseal(KEY, blob, other)


# --- the command -----------------------------------------------------------------------------------


def test_the_command_writes_a_job_and_says_what_goes_where(in_process, tmp_path: Path):
    out = tmp_path / "job"
    code, stdout, stderr = in_process("certs", "--out", str(out), "--edges", "2", "--central-host", "10.8.0.1")
    assert code == 0, stderr
    assert files_of(out) == {"ca": {"ca.pem", "ca.key", "edges.key"}, "central": {"ca.pem", "cert.pem", "key.pem"},
                             "edge1": EDGE_FILES, "edge2": EDGE_FILES}
    assert f"wrote {out / 'ca'} (ca.pem, ca.key, edges.key): keep it on this machine only" in stdout
    assert f"wrote {out / 'central'} (ca.pem, cert.pem, key.pem): copy it to the central's host; it answers as " \
           f"10.8.0.1, and holds no edges key" in stdout
    assert f"wrote {out / 'edge2'} (ca.pem, cert.pem, key.pem, edges.key): copy it to edge2's host" in stdout
    code, stdout, _ = in_process("certs", "--out", str(out), "--edges", "edge3")
    assert code == 0 and stdout.splitlines()[0] == f"wrote {out / 'edge3'} (ca.pem, cert.pem, key.pem, edges.key): " \
                                                   f"copy it to edge3's host"
    code, stdout, stderr = in_process("certs", "--out", str(out), "--edges", "edge3")
    assert (code, stdout) == (2, "") and stderr.startswith(f"split_trainer: error: {out / 'edge3' / 'cert.pem'} exists")


@pytest.mark.parametrize("argv, says", [
    ([], "the following arguments are required: --out"),
    (["--out", "{tmp}/job"], "holds no job yet: name its edges"),
    (["--out", "{tmp}/job", "--edges", "0"], "--edges 0: a job has at least one edge"),
    (["--out", "{tmp}/job", "--edges", "edge1,node2"], "edge name 'node2' is not one the topology gives"),
    (["--out", "{tmp}/job", "--edges", "edge0"], "edge name 'edge0' is not one the topology gives"),
    (["--out", "{tmp}/job", "--edges", "edge1,edge1"], "edge edge1 is named twice"),
    (["--out", "{tmp}/job", "--edges", "2", "--days", "0"], "--days 0: certificates must be valid for at least 1"),
    (["--out", "{tmp}/job", "--edges", "2", "--days", "x"], "argument --days: invalid int value"),
    (["--out", "{tmp}/job", "--edges", "2", "--central-host", "a host"], "--central-host 'a host' is neither"),
    (["--out", "{tmp}/file/job", "--edges", "2"], "cannot write {tmp}/file/job: {tmp}/file is not a folder"),
])
def test_the_commands_refusals_are_one_line_and_write_nothing(in_process, tmp_path: Path, argv, says):
    (tmp_path / "file").write_text("a file, not a folder\n")
    code, stdout, stderr = in_process("certs", *(a.format(tmp=tmp_path) for a in argv))
    assert (code, stdout) == (2, "")
    assert stderr.count("\n") == 1 and stderr.startswith("split_trainer: error: "), stderr
    assert says.format(tmp=tmp_path) in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no job, no staging folder
