"""Identity by certificate for the grpc transport, and the edges' sealing key (its use:
transport.sealing).

On that transport the edges dial out to the central over mutual TLS: the central proves itself
with a server certificate, each edge with a client certificate whose common name is its name, and
both are signed by the job's own CA, so the central takes an edge's name from its certificate
(``peer_name``) rather than from what the edge says. ``make_job`` issues them (``python -m
split_trainer certs``); ``load_bundle`` reads one host's share and refuses, in one line, anything
TLS would refuse later with less to say.

Edge replicas travel edge to edge through the central, which must relay them without reading them:
each edge holds a 256-bit AES key that the central is never given (``edges.key``).

The layout of OUT, what goes to which machine: docs/hosts-and-security.md. Everything
cryptographic here is the ``cryptography`` package's; this module only chooses and checks.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from split_trainer.core.errors import ConfigError
from split_trainer.core.files import atomic_write

CENTRAL = "central"
CA = "ca"
EDGE_NAME = re.compile(r"edge[1-9][0-9]*")
"""An edge's name as the topology gives it (transport/topology.py): edge1, edge2, ..."""
DEFAULT_CENTRAL_HOSTS = ("localhost", "127.0.0.1")
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_NAME = re.compile(rf"(?=.{{1,253}}$){LABEL}(\.{LABEL})*")
HOW = "python -m split_trainer certs --out DIR --edges N"
EDGES_KEY_BYTES = 32  # AES-256
BACKDATE = dt.timedelta(hours=1)
"""Certificates start an hour before they are issued: a host whose clock lags the operator's
would otherwise refuse a fresh certificate as not yet valid."""
NAME_URI = "split-trainer:"
"""An edge's certificate also carries its name as the URI SAN ``split-trainer:edge1``. A URI, not
a DNSName: an edge's name is not a host name, and a DNSName would let a TLS client that ignores
extended key usage accept an edge's certificate as a server called edge1 wherever that resolves;
a URI SAN is how workload identities are written (SPIFFE), and gRPC reports it as peer_uri."""


@dataclass(frozen=True)
class Bundle:
    """One host's share of the job, as ``load_bundle`` read and checked it."""

    name: str
    """The certificate's common name: central, or edge1, edge2, ..."""
    ca_pem: bytes
    """The job's CA certificate: the one root this host trusts."""
    cert_pem: bytes
    key_pem: bytes
    edges_key: Optional[bytes]
    """The edges' 32-byte AES key (an edge's bundle only: the central never holds it)."""


@dataclass(frozen=True)
class Issued:
    """What one ``make_job`` call wrote."""

    out: Path
    made_ca: bool
    """This call made the CA and the edges key (a new job), rather than reusing OUT's."""
    names: list[str]
    """The bundles issued now, in order (central first when it is among them)."""
    not_after: dt.datetime
    """When the certificates issued now expire (UTC)."""
    central_hosts: list[str]
    """The names in the central's certificate, when it was issued now; else empty."""


# --- issuing ---------------------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: fast, and every TLS stack takes it


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # unencrypted: a service starts unattended


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _make_ca(now: dt.datetime, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    # a random tag in the name: two jobs' CAs differ by name too, so a stray certificate is refused
    # as "another CA's" instead of failing its signature against a namesake
    name = _cn(f"split_trainer job CA {secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)  # signs leaves only
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _key_usage(**on: bool) -> x509.KeyUsage:
    off = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
           "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{**dict.fromkeys(off, False), **on})


def _san(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    if name != CENTRAL:
        return [x509.UniformResourceIdentifier(NAME_URI + name)]
    return [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]


def _issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str, hosts: Sequence[str],
           now: dt.datetime, days: int) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a leaf: the central's server certificate or an edge's client one. It
    ends when the CA does at the latest: a chain is no better than its root."""
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if name == CENTRAL else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(_cn(name)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)  # signs its TLS handshakes
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san(name, hosts)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _cert_pem(cert), _key_pem(key)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def check_request(edges: Sequence[str], central_hosts: Sequence[str], days: int) -> None:
    """One line for the first thing wrong with what is asked, before anything is made."""
    for name in edges:
        if not EDGE_NAME.fullmatch(name):
            raise ConfigError(f"edge name {name!r} is not one the topology gives: edges are edge1, edge2, ... "
                              f"(or --edges N for edge1..edgeN)")
    twice = sorted({name for name in edges if list(edges).count(name) > 1})
    if twice:
        raise ConfigError(f"edge {twice[0]} is named twice")
    for host in central_hosts:
        if not (_is_ip(host) or HOST_NAME.fullmatch(host)):
            raise ConfigError(f"--central-host {host!r} is neither a host name nor an IP address")
    if days < 1:
        raise ConfigError(f"--days {days}: certificates must be valid for at least 1 day")


def make_job(out: Path, edges: Sequence[str], central_hosts: Sequence[str] = (), days: int = 365, *,
             now: Optional[dt.datetime] = None) -> Issued:
    """Issue a job's certificates into ``out`` (layout: docs/hosts-and-security.md).

    A new ``out`` gets a CA, the edges key, the central's bundle and one bundle per edge. An
    ``out`` that holds a CA already keeps it and its edges key and gets only what is missing: the
    central's bundle if it is gone, and the edges named (adding edge4 to a job). A named edge whose
    bundle exists, or ``central_hosts`` for a central that has one, is refused with one line: a
    certificate in use is never overwritten. ``central_hosts`` empty: localhost and 127.0.0.1.
    ``now`` is the issue time (tests issue certificates in the past)."""
    out = Path(out)
    check_request(edges, central_hosts, days)
    now = now or dt.datetime.now(dt.timezone.utc)
    made_ca = not (out / CA / "ca.pem").exists()
    if made_ca:
        if not edges:
            raise ConfigError(f"{out} holds no job yet: name its edges (--edges N, or --edges edge1,edge2,...)")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"{out} exists and holds no job's CA ({out / CA / 'ca.pem'}): give certs a new or "
                              f"empty folder")
        ca, ca_key = _make_ca(now, days)
        edges_key = AESGCM.generate_key(bit_length=8 * EDGES_KEY_BYTES)
    else:
        ca, ca_key, edges_key = _read_ca(out, now)
    names = _wanted(out, edges, central_hosts)
    hosts = list(central_hosts) or list(DEFAULT_CENTRAL_HOSTS)
    files: dict[str, dict[str, bytes]] = {}
    if made_ca:
        files[CA] = {"ca.pem": _cert_pem(ca), "ca.key": _key_pem(ca_key), "edges.key": _hex(edges_key)}
    for name in names:
        cert_pem, key_pem = _issue(ca, ca_key, name, hosts, now, days)
        files[name] = {"ca.pem": _cert_pem(ca), "cert.pem": cert_pem, "key.pem": key_pem}
        if name != CENTRAL:
            files[name]["edges.key"] = _hex(edges_key)
    _write(out, files, new=made_ca)
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    return Issued(out, made_ca, names, not_after, hosts if CENTRAL in names else [])


def _wanted(out: Path, edges: Sequence[str], central_hosts: Sequence[str]) -> list[str]:
    """The bundles to issue now, or one line naming a bundle that exists."""
    central_there = (out / CENTRAL).exists()
    if central_there and central_hosts:
        raise ConfigError(f"{_there(out / CENTRAL)} exists: certs does not overwrite a bundle (to issue the "
                          f"central's again with other names, move {out / CENTRAL} aside and run certs again)")
    for name in edges:
        if (out / name).exists():
            raise ConfigError(f"{_there(out / name)} exists: certs does not overwrite a bundle (to add edges, "
                              f"name only the new ones, e.g. --edges edge{_next_edge(out)}; to issue one again, "
                              f"move its folder aside first)")
    names = ([] if central_there else [CENTRAL]) + list(edges)
    if not names:
        raise ConfigError(f"{out} already holds the central's bundle: name the edges to add, e.g. --edges "
                          f"edge{_next_edge(out)}")
    return names


def _there(folder: Path) -> Path:
    return folder / "cert.pem" if (folder / "cert.pem").exists() else folder


def _next_edge(out: Path) -> int:
    numbers = [int(p.name[4:]) for p in out.iterdir() if EDGE_NAME.fullmatch(p.name)] if out.is_dir() else []
    return max(numbers, default=0) + 1


def _hex(key: bytes) -> bytes:
    return key.hex().encode() + b"\n"  # text: it survives a copy and paste


def _read_ca(out: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    """The CA and edges key of an existing job, to issue more of its bundles."""
    folder = out / CA
    ca = _load_cert(_read(folder / "ca.pem"), folder / "ca.pem")
    ca_key = _load_key(_read(folder / "ca.key", secret=True), folder / "ca.key")
    edges_key = _load_edges_key(_read(folder / "edges.key", secret=True), folder / "edges.key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not _same_key(ca, ca_key):
        raise ConfigError(f"{folder / 'ca.key'} is not the key of {folder / 'ca.pem'}")
    if ca.not_valid_after_utc <= now:
        raise ConfigError(f"the job's CA {folder / 'ca.pem'} expired on {_day(ca.not_valid_after_utc)}: make a "
                          f"new job (certs --out ANOTHER_DIR) and give every host its new bundle")
    return ca, ca_key, edges_key


def _write(out: Path, files: dict[str, dict[str, bytes]], new: bool) -> None:
    """Every folder appears whole or not at all: each is written in a staging folder (0700, files
    0600 from mkstemp) and renamed into place; a new job's whole ``out`` is renamed at once."""
    stage = None
    parent = out.parent if new else out
    there = next(p for p in (parent, *parent.parents) if p.exists())
    if not there.is_dir():  # mkdir would say "File exists" of it
        raise ConfigError(f"cannot write {out}: {there} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.certs.", dir=parent))  # mode 0700
        for folder, contents in files.items():
            (stage / folder).mkdir(mode=0o700)
            os.chmod(stage / folder, 0o700)  # whatever the umask says
            for filename, data in contents.items():
                atomic_write(stage / folder / filename, lambda f, data=data: f.write(data))
        if new:
            os.replace(stage, out)  # onto nothing, or onto an empty folder: POSIX rename allows both
            stage = None
        else:
            for folder in files:
                os.rename(stage / folder, out / folder)
    except OSError as exc:
        raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


# --- reading and checking --------------------------------------------------------------------------


def _read(path: Path, secret: bool = False) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing (certs makes the job's files: {HOW})") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if secret and mode & 0o077:  # as ssh treats a private key: one that others can read is no secret
        raise ConfigError(f"{path} can be read by others (mode {mode & 0o777:o}): chmod 600 {path}")
    return data


def _load_cert(data: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate") from None


def _load_key(data: bytes, path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None


def _load_edges_key(data: bytes, path: Path) -> bytes:
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except ValueError:
        key = b""
    if len(key) != EDGES_KEY_BYTES:
        raise ConfigError(f"{path} is not an edges key ({2 * EDGES_KEY_BYTES} hex digits)")
    return key


def _same_key(cert: x509.Certificate, key: Any) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _day(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _check_dates(cert: x509.Certificate, path: Path, now: dt.datetime, renew: str) -> None:
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"{path} is not valid before {_day(cert.not_valid_before_utc)}: check this host's clock")
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{path} expired on {_day(cert.not_valid_after_utc)}: {renew}")


def _verify(ca: x509.Certificate, cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    """The chain as the web PKI profile checks it (cryptography's verifier): signed by this CA,
    for the role its name says (a server for the central, a client for an edge)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{path} is not signed by this bundle's CA ({path.with_name('ca.pem')}): the two come "
                          f"from different jobs") from None
    builder = PolicyBuilder().store(Store([ca])).time(now)
    try:
        if _common_name(cert) == CENTRAL:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            subject = IPAddress(san[0].value) if isinstance(san[0], x509.IPAddress) else DNSName(san[0].value)
            builder.build_server_verifier(subject).verify(cert, [])
        else:
            builder.build_client_verifier().verify(cert, [])
    except (VerificationError, x509.ExtensionNotFound, IndexError) as exc:
        raise ConfigError(f"{path} does not verify against {path.with_name('ca.pem')}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def load_bundle(folder: Path, *, now: Optional[dt.datetime] = None) -> Bundle:
    """One host's bundle (``OUT/central`` or ``OUT/edgeN`` as certs wrote it, copied to that host),
    checked: the files are there and PEM, the private key is readable by its owner only and is the
    certificate's, the certificate is in its dates and signed by the bundle's CA. Anything else is
    one line (ConfigError)."""
    folder = Path(folder)
    now = now or dt.datetime.now(dt.timezone.utc)
    ca_pem, cert_pem = _read(folder / "ca.pem"), _read(folder / "cert.pem")
    key_pem = _read(folder / "key.pem", secret=True)
    ca, cert = _load_cert(ca_pem, folder / "ca.pem"), _load_cert(cert_pem, folder / "cert.pem")
    key = _load_key(key_pem, folder / "key.pem")
    _check_dates(ca, folder / "ca.pem", now, "the job needs a new CA (certs --out ANOTHER_DIR) and every host "
                 "its new bundle")
    _check_dates(cert, folder / "cert.pem", now, "issue this bundle again (move its folder in certs' OUT aside "
                 "and run certs --out OUT --edges NAME; the central's: certs --out OUT)")
    if not _same_key(cert, key):
        raise ConfigError(f"{folder / 'key.pem'} is not the key of {folder / 'cert.pem'}")
    _verify(ca, cert, folder / "cert.pem", now)
    name = _common_name(cert)
    key_path = folder / "edges.key"
    if name == CENTRAL:
        if key_path.exists():  # the central relays sealed replicas and must not be able to open them
            raise ConfigError(f"{key_path} is in the central's bundle: remove it (only the edges hold the edges key)")
        edges_key = None
    else:
        edges_key = _load_edges_key(_read(key_path, secret=True), key_path)
    return Bundle(name, ca_pem, cert_pem, key_pem, edges_key)


def name_of(cert_pem: bytes) -> str:
    """The name a certificate gives its holder: its subject's common name."""
    return _common_name(_load_cert(cert_pem, Path("the certificate")))


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError("the certificate names no one (no common name)")
    value = names[0].value
    return value.decode() if isinstance(value, bytes) else value


def peer_name(context: Any) -> Optional[str]:
    """The name in the client certificate of a gRPC call's peer (``grpc.ServicerContext``), as the
    TLS handshake verified it against the job's CA; None on a connection without one. The central
    takes an edge's name from here, never from the request."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if len(names) == 1 else None
