"""Revoked edge certificates for the grpc transport: an X.509 revocation list (CRL) signed by the
job's CA, which the central reads at every connection.

    python -m split_trainer certs --out certs/job --revoke edge2

writes ``OUT/central/revoked.crl`` (every certificate revoked so far in this job, by serial
number). Copy it to the central's host, into its bundle folder: the next connection with a revoked
certificate is refused, in one line on both sides, before anything of the job is sent; the central
need not restart. A certificate is revoked, not a name: an edge issued again (its folder moved
aside, ``certs --edges edge2``) has a new serial and is let in.

gRPC's Python server cannot be given a CRL, so the check is the central's own, right after the
TLS handshake (transport.grpc_central); the list's signature is checked against the job's CA, so a
list someone else wrote is refused rather than trusted.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from split_trainer.core.errors import ConfigError
from split_trainer.core.files import atomic_write
from split_trainer.transport.identity import CA, CENTRAL, EDGE_NAME, _load_cert, _load_key, _read

CRL = "revoked.crl"


def revoke(out: Path, names: Sequence[str], *, now: Optional[dt.datetime] = None) -> dict[str, int]:
    """Add the certificates of the edges ``names`` (their bundles in ``out``) to the job's list,
    written to ``out/central/revoked.crl``; returns each name's serial number."""
    out, now = Path(out), now or dt.datetime.now(dt.timezone.utc)
    ca = _load_cert(_read(out / CA / "ca.pem"), out / CA / "ca.pem")
    ca_key = _load_key(_read(out / CA / "ca.key", secret=True), out / CA / "ca.key")
    serials = {}
    for name in names:
        if not EDGE_NAME.fullmatch(name):
            raise ConfigError(f"--revoke {name!r}: only an edge's certificate can be revoked (edge1, edge2, ...)")
        serials[name] = _load_cert(_read(out / name / "cert.pem"), out / name / "cert.pem").serial_number
    path = out / CENTRAL / CRL
    before = _load(path, ca) if path.exists() else []
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
               .next_update(now + dt.timedelta(days=3650)))
    known = {entry.serial_number for entry in before}
    for entry in before:
        builder = builder.add_revoked_certificate(entry)
    for serial in serials.values():
        if serial not in known:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(ca_key, hashes.SHA256())
    try:
        atomic_write(path, lambda f: f.write(crl.public_bytes(serialization.Encoding.PEM)))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return serials


def revoked(folder: Path, ca_pem: bytes) -> frozenset[int]:
    """The serial numbers revoked in the central's bundle ``folder`` (none without a list); a
    list that does not parse or is not signed by the job's CA is one line (ConfigError)."""
    path = Path(folder) / CRL
    if not path.exists():
        return frozenset()
    ca = _load_cert(ca_pem, Path(folder) / "ca.pem")
    return frozenset(entry.serial_number for entry in _load(path, ca))


def _load(path: Path, ca: x509.Certificate) -> list[x509.RevokedCertificate]:
    try:
        crl = x509.load_pem_x509_crl(_read(path))
    except ValueError:
        raise ConfigError(f"{path} is not a PEM revocation list (certs --out OUT --revoke NAME writes it)") from None
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):
        raise ConfigError(f"{path} is not signed by this job's CA: use the list certs wrote for this job")
    return list(crl)


def peer_serial(context: Any) -> Optional[int]:
    """The serial number of a gRPC call's client certificate (as the TLS handshake received it)."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if len(pems) != 1:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0]).serial_number
    except ValueError:
        return None
