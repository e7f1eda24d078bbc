"""``python -m split_trainer certs``: a job's certificates for the grpc transport (issue 36, in
progress): its CA, the central's server certificate, one client certificate per edge and the
edges' sealing key, each host's share in a folder of its own (transport/identity.py).

    python -m split_trainer certs --out certs/job --edges 3 --central-host central.example.org
    python -m split_trainer certs --out certs/job --edges edge4        # add an edge to that job
    python -m split_trainer certs --out certs/job --revoke edge2       # refuse edge2's certificate

What goes to which machine: docs/hosts-and-security.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from split_trainer.config import ConfigError
from split_trainer.transport import revocation
from split_trainer.transport.identity import CA, CENTRAL, Issued, make_job


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as the package's other refusals: one line, exit 2 (ConfigError)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"certs: {message} (python -m split_trainer certs --help)")


def edge_names(text: str) -> list[str]:
    """``--edges``: a count N (edge1..edgeN) or names separated by commas (checked by make_job)."""
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise ConfigError(f"--edges {text}: a job has at least one edge")
        return [f"edge{i}" for i in range(1, int(text) + 1)]
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"--edges {text!r}: give a count (--edges 3) or names (--edges edge1,edge2)")
    return names


def report(issued: Issued) -> list[str]:
    """What was written and which folder goes to which machine."""
    out = issued.out
    lines = []
    if issued.made_ca:
        lines.append(f"wrote {out / CA} (ca.pem, ca.key, edges.key): keep it on this machine only; it issues "
                     f"this job's certificates (run certs --out {out} again to add edges)")
    for name in issued.names:
        if name == CENTRAL:
            lines.append(f"wrote {out / CENTRAL} (ca.pem, cert.pem, key.pem): copy it to the central's host; it "
                         f"answers as {', '.join(issued.central_hosts)}, and holds no edges key")
        else:
            lines.append(f"wrote {out / name} (ca.pem, cert.pem, key.pem, edges.key): copy it to {name}'s host")
    lines.append(f"the certificates issued now expire on {issued.not_after:%Y-%m-%d %H:%M} UTC; every file is "
                 f"readable by its owner only: copy the folders so (scp -rp), never into a shared place")
    return lines


def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m split_trainer certs",
                     description="Issue a job's certificates for the grpc transport (mutual TLS) and the "
                                 "edges' sealing key.")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="the job's folder: a new or empty one, or one certs made (then only what is "
                             "missing is issued, with the same CA)")
    parser.add_argument("--edges", metavar="N|edge1,edge2,...",
                        help="the edges to issue: a count (edge1..edgeN) or names; needed for a new job")
    parser.add_argument("--central-host", dest="central_hosts", action="append", default=[], metavar="NAME",
                        help="a name or IP address the edges reach the central by (repeat for more; default: "
                             "localhost and 127.0.0.1)")
    parser.add_argument("--days", type=int, default=365, help="how long the certificates are valid (default 365)")
    parser.add_argument("--revoke", metavar="edge1,edge2,...",
                        help="revoke these edges' certificates: the list goes to OUT/central/revoked.crl, which "
                             "the central reads at every connection (copy it to the central's bundle folder)")
    args = parser.parse_args(argv[1:])
    if args.revoke is not None:
        if args.edges is not None or args.central_hosts:
            raise ConfigError("certs: --revoke issues nothing: give it without --edges and --central-host")
        if args.revoke.strip().isdigit():
            raise ConfigError(f"certs: --revoke {args.revoke}: name the edges (--revoke edge2,edge3)")
        for name, serial in revocation.revoke(args.out, edge_names(args.revoke)).items():
            print(f"revoked {name} (serial {serial:x}) in {args.out / CENTRAL / revocation.CRL}: copy it into the "
                  f"central's bundle folder; the central refuses that certificate from its next connection on")
        return 0
    edges = edge_names(args.edges) if args.edges is not None else []
    issued = make_job(args.out, edges, args.central_hosts, args.days)
    for line in report(issued):
        print(line)
    return 0
