"""A job admits only its own hosts: before the central sends an edge anything of the job (its
config, the edge weights, batches), the edge proves that it holds the job's secret, and the
central proves the same to the edge. Both transports run this same code; each gives it a ``Door``
(how to reach an edge that is not connected yet).

For each edge, two calls from the central, made before ``Transport.connect``:

    ask   the central sends a fresh random nonce; the edge answers with its host name, a nonce of
          its own and HMAC-SHA256(secret, "edge", its name, both nonces), or no MAC when it holds
          no secret;
    tell  the verdict: admitted (with HMAC-SHA256(secret, "central", the edge's name, both
          nonces), which an edge holding the secret checks before it serves), refused (why), or
          stopped (a fixed fleet that refused another edge).

Fresh nonces make each proof good for one exchange; the role inside each MAC keeps one side's
proof from passing for the other's. Python's hmac and secrets do the cryptography.

Who must prove what: no secret on the central and none on an edge is an unauthenticated job, as
before there were secrets (one machine, ``torchrun --nproc_per_node``); a secret on the central
means every edge proves it; an edge holding a secret that the central lacks is refused as well
(the two ends disagree about the job, and the edge would otherwise serve an unproven central).

A refused edge leaves with one line (exit 2: its secret is configuration, and a retry would be
refused again). A fixed fleet (topology.min_edges null) then stops, every rank with one line, exit
2. An elastic fleet goes on without it: in one process (loopback) at once; a torch RPC group
cannot shed a member (its graceful shutdown and torchrun's exit barrier wait for every member of
the round), so there the central ends the round (exit 1, one of its --max-restarts) and the hosts
meet again without the refused one, which has stopped its own torchrun agent (``stop_host``).

What the secret does not stop (anyone on the network path can still run code in every rank):
docs/hosts-and-security.md.

    python -m split_trainer.transport.admission [--file F] CONFIG [ARGS...]

prints the job's secret file (F, else the run folder's job.secret), made now when there is none:
launch/central.sh's part.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

from split_trainer.config import ConfigError, TopologyConfig, load_config
from split_trainer.core.errors import JobError, printable, say, short

SECRET = "SPLIT_TRAINER_SECRET"
"""The job's secret itself (an environment variable keeps it off every command line)."""
SECRET_FILE = "SPLIT_TRAINER_SECRET_FILE"
"""A file holding the job's secret (readable by its owner only)."""
RUN_FOLDER_FILE = "job.secret"
"""Without either variable, a rank looks for this file in its run folder: launch/central.sh writes
it there, so on one machine every rank finds it without being told."""
MIN_LENGTH = 16
NONCE_BYTES = 32
HOW = "launch/edge.sh --secret-file FILE, or SPLIT_TRAINER_SECRET_FILE"

# Why an edge is refused: (as the central says it, as the edge says it).
REASONS = {
    "none": ("it holds no secret for this job",
             f"this host holds no secret for this job, and the central requires one (give it the job's secret: {HOW})"),
    "wrong": ("its secret is not this job's",
              f"this host's secret is not this job's (give it the central's: {HOW})"),
    "unasked": ("it holds a secret and the central has none",
                "this host holds a secret and the central has none "
                "(give the central the same secret, or this host none)"),
}


def job_key(run_dir: str | Path, env: Optional[Mapping[str, str]] = None) -> Optional[bytes]:
    """This process's copy of the job's secret: SPLIT_TRAINER_SECRET, or the file named by
    SPLIT_TRAINER_SECRET_FILE, or else ``run_dir``/job.secret if there is one; None: no secret.
    Anything wrong with it is a ConfigError (one line, exit 2, before RPC starts)."""
    env = os.environ if env is None else env
    value, path = env.get(SECRET), env.get(SECRET_FILE)
    if value is not None and path is not None:
        raise ConfigError(f"both {SECRET} and {SECRET_FILE} are set: give the job's secret one way")
    if value is not None:
        return _checked(value.strip(), SECRET)
    if path is None:
        path = Path(run_dir) / RUN_FOLDER_FILE
        if not os.path.lexists(path):  # a link to nowhere is a secret file gone wrong, not no secret
            return None
    return _checked(_read(Path(path)), f"in {path}")


def _read(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the job's secret file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}")
    if info.st_mode & 0o077:  # as ssh treats a private key: a secret others can read is no secret
        raise ConfigError(f"the job's secret file {path} can be read by others (mode {info.st_mode & 0o777:o}): "
                          f"chmod 600 {path}")
    if info.st_uid != os.getuid():  # as ssh: another user's file could be read or changed by that user
        raise ConfigError(f"the job's secret file {path} belongs to user id {info.st_uid}, not to this user "
                          f"({os.getuid()}): use a copy of your own (mode 600)")
    return text.strip()


def _checked(text: str, source: str) -> bytes:
    if len(text) < MIN_LENGTH:
        raise ConfigError(f"the job's secret ({source}) has {len(text)} characters: use at least {MIN_LENGTH} "
                          f"(launch/central.sh makes one of 64)")
    return text.encode()


def ensure_file(path: Path) -> bool:
    """The job's secret file at ``path``, checked, or made now (64 hex characters, mode 600) when
    there is none; True when made."""
    if os.path.lexists(path):  # a dangling link is read, and refused, as it stands
        _checked(_read(path), f"in {path}")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # created with its final mode: there is no moment at which others could read it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start made it first: that one is the job's
        return ensure_file(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


def _mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts: no two lists of parts make the same message."""
    message = b"".join(len(p).to_bytes(4, "big") + p for p in (b"split_trainer admission", *parts))
    return hmac.new(key, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class Proof:
    """An edge's answer to the central's challenge."""
    host: str
    nonce: bytes
    mac: Optional[bytes]


@dataclass(frozen=True)
class Verdict:
    kind: str
    """admitted, refused or stopped."""
    mac: Optional[bytes] = None
    """admitted: the central's proof (None when the central holds no secret)."""
    reason: str = ""
    """refused: a key of REASONS; stopped: the central's line."""


def stop_host(agent: int) -> None:
    """Stop this host's torchrun agent ``agent``, this process's parent (call only where it runs
    nothing but edges of an elastic fleet). A refused host is refused again in every round: a worker that exits is restarted by its
    agent, which joins the next round (a round for the whole fleet each time), and an agent whose
    restarts run out closes the job's rendezvous for every host (torch.distributed.launcher.api
    shuts it down on ChildFailedError). An agent stopped by a signal leaves it open, as a lost
    host does. The agent passes SIGTERM on to its workers: this one ignores it and exits by itself,
    after its line."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() == agent:  # else the agent is gone, and this process has a new parent (init, say)
        os.kill(agent, signal.SIGTERM)


class EdgeSide:
    """An edge's half: it proves the secret, checks the central's proof and hears the verdict.
    ``out`` is the edge's one line once it must leave (refused, or the job stopped)."""

    def __init__(self, name: str, key: Optional[bytes], stops_host: bool = False):
        self.name, self.key = name, key
        self.agent = os.getppid() if stops_host else None  # its torchrun agent, while it is sure to be alive
        self.nonce = b""  # this edge's, drawn afresh for the challenge it answers
        self.asked: Optional[bytes] = None  # the central's nonce
        self.admitted = False  # the central proved the job's secret (or neither side holds one)
        self.out: Optional[str] = None
        self.left = threading.Event()  # set once the edge has done what leaving takes (``leave``)

    def prove(self, nonce: bytes) -> Proof:
        """The answer to the central's challenge: one per admission, which this edge opened as it
        started. A second challenge is refused: the edge is no oracle that MACs any nonce it is sent."""
        if self.asked is not None:
            raise RuntimeError(f"{self.name} answers one challenge per admission, and has answered one")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise RuntimeError(f"{self.name} was sent a challenge that is not {NONCE_BYTES} bytes")
        self.asked, self.nonce = nonce, secrets.token_bytes(NONCE_BYTES)
        mac = None if self.key is None else _mac(self.key, b"edge", self.name.encode(), nonce, self.nonce)
        return Proof(socket.gethostname(), self.nonce, mac)

    def serves(self) -> None:
        """Raise unless this edge may take the job: holding a secret, only once the central proved it."""
        if self.key is not None and not self.admitted:
            raise RuntimeError(f"{self.name} takes no job before the central has proved the job's secret to it")

    def hear(self, verdict: Verdict) -> Optional[str]:
        """The central's verdict; returns why this edge refuses the central, if it does."""
        if self.asked is None:
            raise RuntimeError(f"{self.name} hears no verdict on a challenge it was not sent")
        self.admitted = verdict.kind == "admitted" and (self.key is None or self._proven(verdict.mac))
        if verdict.kind == "refused":
            self.out = f"refused by the central: {REASONS.get(verdict.reason, (verdict.reason,) * 2)[1]}"
        elif verdict.kind == "stopped":
            self.out = f"the central stopped the job: {verdict.reason}"
        elif self.key is not None and not self._proven(verdict.mac):
            self.out = "refused the central: it did not prove the job's secret"
            return "it did not prove the job's secret to the edge"
        return None

    def _proven(self, mac: Optional[bytes]) -> bool:
        if not isinstance(mac, bytes) or self.asked is None:  # a peer's word, of any type
            return False
        return hmac.compare_digest(mac, _mac(self.key, b"central", self.name.encode(), self.nonce, self.asked))

    def leave(self) -> None:
        """If this edge must leave (an edge process, on its main thread): its one line, its host
        stopped when it should be (``stop_host``), exit 2. It prints and exits by itself, where any
        other failure goes through ``__main__``: the line must be out before the agent hears the
        signal (the agent's own log lines would cut into it), and the agent must hear it before this
        process ends (or it restarts the process into another refusal)."""
        if self.out is None:
            return
        say(f"split_trainer: [{self.name}] error: {self.out}")
        try:
            if self.agent is not None:
                stop_host(self.agent)
        finally:
            self.left.set()  # the verdict's call may answer now
            os._exit(2)


class Pending(Protocol):
    def wait(self) -> Any: ...


@dataclass
class Door:
    """How the central reaches an edge that is not connected yet: a transport's part."""
    ask: Callable[[str, bytes], Pending]
    """``ask(name, nonce)``: the edge's Proof."""
    tell: Callable[[str, Verdict], Pending]
    """``tell(name, verdict)``: None, or why the edge refuses the central."""
    where: Callable[[str], str]
    sheds: bool
    """Whether an elastic fleet can go on without a refused edge in this group (see the module)."""


def admit(names: list[str], door: Door, key: Optional[bytes], topology: TopologyConfig) -> list[str]:
    """The edges ``names`` that prove the job's secret (all of them, or the elastic fleet's rest),
    each told its verdict before anything else reaches it; raise when the job cannot go on so."""
    nonces = {name: secrets.token_bytes(NONCE_BYTES) for name in names}
    asked = [(name, door.ask(name, nonces[name])) for name in names]  # every edge at once
    proofs = {name: _answer(door, name, pending) for name, pending in asked}
    refused = {name: reason for name in names
               if (reason := _judge(key, name, nonces[name], proofs[name])) is not None}
    admitted = [name for name in names if name not in refused]
    # With a secret, each edge admitted gets the central's proof, and checks it before it serves.
    confirm = {} if key is None else {
        name: Verdict("admitted", _mac(key, b"central", name.encode(), proofs[name].nonce, nonces[name]))
        for name in admitted}
    if not refused:
        _confirm(door, confirm)
        return admitted
    line = "; ".join(f"{name} ({door.where(name)}, host {printable(proofs[name].host)}) refused: {REASONS[reason][0]}"
                     for name, reason in refused.items())
    _tell(door, {name: Verdict("refused", reason=reason) for name, reason in refused.items()})
    elastic = topology.fewest < topology.edges
    if elastic and not door.sheds:  # the edges admitted are restarted by their agents for the new round
        raise JobError(f"{line}; the others meet again without {'it' if len(refused) == 1 else 'them'}")
    if elastic and len(admitted) >= topology.fewest:
        _confirm(door, confirm)
        say(f"split_trainer: warning: {line}; going on with {', '.join(admitted)}")
        return admitted
    _tell(door, {name: Verdict("stopped", reason=line) for name in admitted})
    need = "a fixed fleet needs every edge" if not elastic else \
        f"{len(admitted)} admitted, topology.min_edges={topology.min_edges}"
    raise ConfigError(f"{line}; {need}")


def _answer(door: Door, name: str, pending: Pending) -> Proof:
    try:
        return pending.wait()
    except Exception as exc:  # an edge that dies or hangs at the door fails the job as at any first call
        raise JobError(f"{name} ({door.where(name)}) did not answer the central's challenge: {short(exc)}") from exc


def _judge(key: Optional[bytes], name: str, nonce: bytes, proof: Proof) -> Optional[str]:
    """Why the edge is refused (a key of REASONS), or None."""
    if key is None:
        return None if proof.mac is None else "unasked"
    if proof.mac is None:
        return "none"
    if not (isinstance(proof.mac, bytes) and isinstance(proof.nonce, bytes)):  # a peer's word, of any type
        return "wrong"
    expected = _mac(key, b"edge", name.encode(), nonce, proof.nonce)
    return None if hmac.compare_digest(proof.mac, expected) else "wrong"


def _tell(door: Door, verdicts: dict[str, Verdict]) -> None:
    """Tell edges that must leave, all at once. Each leaves as soon as it has heard, and may be gone
    before its reply is written: a failed reply says no more than a reply would."""
    for pending in [door.tell(name, verdict) for name, verdict in verdicts.items()]:
        try:
            pending.wait()
        except Exception:
            pass


def _confirm(door: Door, verdicts: dict[str, Verdict]) -> None:
    """Tell the edges admitted. (An edge refuses a central that proved nothing only when the two
    disagree about the secret, which the challenge has already caught: so this is a failure of the
    job, not a refusal to handle.)"""
    for name, pending in [(name, door.tell(name, verdict)) for name, verdict in verdicts.items()]:
        try:
            answer = pending.wait()
        except Exception as exc:
            raise JobError(f"{name} ({door.where(name)}) did not hear its admission: {short(exc)}") from exc
        if answer is not None:
            raise JobError(f"{name} ({door.where(name)}) refused the central: {answer}")


def main(argv: list[str]) -> int:
    """launch/central.sh's part: print the job's secret file, made when there is none."""
    given = argv[1] if argv[:1] == ["--file"] and len(argv) > 1 else None
    argv = argv[2:] if given is not None else argv
    try:
        if not argv:
            raise ConfigError("usage: python -m split_trainer.transport.admission [--file F] CONFIG [ARGS...]")
        overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]  # as launch/edges_of.py reads them
        path = Path(given) if given else Path(load_config(argv[0], overrides).output.run_dir) / RUN_FOLDER_FILE
        ensure_file(path)
    except ConfigError as exc:
        say(f"split_trainer: error: {exc}")
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
