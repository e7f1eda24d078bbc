"""Checkpoints of both sides, written by the central, one folder per step.

A checkpoint is written into a hidden temporary folder, every file fsynced, a manifest (sizes
and SHA-256 of every file) written last, and the folder renamed to ``step_<N>``: a folder with
that name and a manifest that matches its files is complete, and nothing else counts. A kill
at any moment therefore leaves the newest complete checkpoint loadable. Files are read back with
``torch.load(weights_only=True)``, so a checkpoint can never run code.

A checkpoint may come from anyone, so every name in a manifest that becomes a path is checked
before anything is read: its files are plain names in its folder (``PART``), the edge parts it
names are edges (``EDGE``: they become ``edges/<name>/``), and a file that is a link (or no
regular file) is refused. The manifest carries no hash of its own: whoever can rewrite it can
rewrite such a hash too, and what it names is checked here instead; the parts' hashes catch damage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from split_trainer.config import Config, ConfigError
from split_trainer.core import faults
from split_trainer.core.errors import JobError
from split_trainer.core.files import atomic_write

PATTERN = re.compile(r"^step_(\d{8})$")
PART = re.compile(r"[A-Za-z0-9_-]+\.pt")
"""A file a manifest may name (fullmatch): a plain name inside its folder, no separator, no ``..``."""
EDGE = re.compile(r"edge[1-9][0-9]*")
"""An edge part a manifest may name (fullmatch): an edge's name, edgeK, as topology gives it."""
MANIFEST = "manifest.json"
JOB = "job.json"


def directory(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output.run_dir) / "checkpoints")


def fingerprint(cfg: Config, plan: str, placement: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the data set, the model (and its arguments)
    and its plan (``plan.layout_text`` of the layout: which layers run where), and what its
    placement's driver adds (``placement``: with edge-held data the number of edges the shards are
    carved over; a fleet may otherwise shrink or grow, docs/elastic.md)."""
    # The plan names the bottleneck's layers but not their width; only when set, so that the
    # checkpoints of runs without one keep their fingerprint.
    width = {"bottleneck": cfg.model.bottleneck} if cfg.model.bottleneck is not None else {}
    return {**placement, "data": cfg.data.name, "model": cfg.model.name, "args": cfg.model.args, "plan": plan,
            **width}


@dataclass
class Loaded:
    path: Path
    manifest: dict[str, Any]
    parts: dict[str, Any]  # file stem -> loaded object ("central", "edge1", ...)

    @property
    def step(self) -> int:
        return self.manifest["step"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(directory: Path, step: int, parts: dict[str, Any], meta: dict[str, Any], keep: int) -> tuple[Path, int]:
    """Write ``parts`` (stem -> object) as step ``step``; return (folder, bytes written). A write
    that fails (no space, a read-only folder) leaves no trace and raises JobError naming the folder."""
    final = directory / f"step_{step:08d}"
    tmp = directory / f".step_{step:08d}.tmp-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files, total = {}, 0
        for stem, obj in parts.items():
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
            faults.hit("checkpoint")
            atomic_write(tmp / f"{stem}.pt", lambda f: f.write(data))
            files[f"{stem}.pt"] = {"bytes": len(data), "sha256": _sha256(data)}
            total += len(data)
        manifest = {**meta, "step": step, "files": files, "written_at": time.time()}
        atomic_write(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        if final.exists():  # an earlier attempt reached the same step: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise JobError(f"cannot write checkpoint step {step} into {directory}: {exc.strerror or exc} (free space "
                       f"or make the folder writable; earlier checkpoints there are intact)") from None
    _prune(directory, keep)
    return final, total


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: Path, keep: int) -> None:
    for old in complete_candidates(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Remove half-written folders left by a kill during a save."""
    if directory.is_dir():
        for path in directory.glob(".step_*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def complete_candidates(directory: Path) -> list[Path]:
    """Checkpoint folders that have a manifest, newest first (contents not yet verified). Newest
    means last written, not highest step: a run started over in the same folder (``--resume
    never``) counts from step 0 again, and its checkpoints are the ones to keep."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if PATTERN.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (manifest_field(p, "written_at") or 0, p.name), reverse=True)


def load(path: Path) -> Loaded:
    """Load and verify one checkpoint folder; raise ValueError saying what is wrong."""
    manifest = _manifest(path)
    parts = {}
    for name, info in manifest["files"].items():
        file = path / name
        try:
            found = file.lstat()  # the name itself: a link is not followed
            if not stat.S_ISREG(found.st_mode):  # a link would read outside the folder; a FIFO would block
                raise ValueError(f"{file}: not a regular file (a link out of the folder?): refused, nothing read")
            if found.st_size != info["bytes"]:  # known before reading: a part of another size is not read
                raise ValueError(f"{file}: {found.st_size} bytes, expected {info['bytes']} (truncated)")
            data = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"{file}: {exc.strerror}") from None
        if _sha256(data) != info["sha256"]:
            raise ValueError(f"{file}: altered (its SHA-256 does not match the manifest)")
        try:  # weights_only: tensors and plain containers; a pickled object that would run code is refused
            parts[name.removesuffix(".pt")] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            raise ValueError(f"{file}: refused by torch.load(weights_only=True) "
                             f"({str(exc).strip().splitlines()[0][:160]})") from None
    return Loaded(path, manifest, parts)


def _manifest(path: Path) -> dict[str, Any]:
    """``path``'s manifest, refused (ValueError) unless its step is a number, and every file and
    edge part it names is a plain name (``PART``, ``EDGE``) with a size and a SHA-256: checked
    before any of them is read, so that no name in it reaches outside the folder."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no readable {MANIFEST} ({exc})") from None
    step, edge_parts = manifest.get("step"), manifest.get("edge_parts", {})
    if not (isinstance(files, dict) and isinstance(edge_parts, dict) and type(step) is int):
        raise ValueError(f"{path}: {MANIFEST} is not a checkpoint's (its files, edge_parts or step are malformed)")
    for kind, names, pattern, form in (("file", files, PART, "NAME.pt"), ("edge part", edge_parts, EDGE, "edgeK")):
        for name, info in names.items():
            if not pattern.fullmatch(name):
                raise ValueError(f"{path}: {MANIFEST} names the {kind} {name!r}, which is no plain {form} name inside "
                                 f"the checkpoint (a path out of it?): refused, nothing read")
            if not (isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)):
                raise ValueError(f"{path}: {MANIFEST} gives {kind} {name} no size and SHA-256")
    return manifest


def manifest_field(path: Path, key: str) -> Any:
    """One field of a checkpoint's manifest, without reading its parts; None if unreadable."""
    try:
        return json.loads((path / MANIFEST).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def find_resumable(directory: Path, warn, job: str | None = None) -> Loaded | None:
    """The newest checkpoint that loads and verifies (of ``job`` only, when given); broken ones
    are skipped with a warning."""
    for path in complete_candidates(directory):
        if job is not None and manifest_field(path, "job") != job:
            continue
        try:
            return load(path)
        except ValueError as exc:
            warn(f"skipping checkpoint {exc}")
    return None


def launcher() -> str:
    """The torchrun agent this process runs under (host, pid, start time): the same in every
    attempt of one job, and in every round of an elastic one (which torchrun does not count).
    Without torchrun (topology.transport=loopback) this process itself: it has no restarts."""
    agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    try:
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()}:{agent}:{started}"


def job_of_run(run_dir: Path, agent: str) -> str | None:
    """The id of the job that this run folder's torchrun agent ``agent`` started, if any: a
    restart or a new round finds its own job by it."""
    try:
        job = json.loads((run_dir / JOB).read_text())
        return job["id"] if job.get("launcher") == agent else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def start_job(run_dir: Path, agent: str) -> str:
    """A new job: a fresh id that its checkpoints carry, so that its restarts find their own."""
    job = uuid.uuid4().hex
    atomic_write(run_dir / JOB, lambda f: f.write(json.dumps({"id": job, "launcher": agent,
                                                              "started_at": time.time()}).encode()))
    return job


def resolve(resume: str, directory: Path, warn, job: str | None = None) -> Loaded | None:
    """Apply ``--resume auto|never|PATH``. A restarted attempt of a job (``job`` given) first
    takes that job's own newest checkpoint, whatever the first attempt was told."""
    if job is not None:
        own = find_resumable(directory, warn, job)
        if own is not None:
            return own
    if resume == "never":
        return None
    if resume == "auto":
        return find_resumable(directory, warn)
    path = Path(resume)
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {MANIFEST}); "
                          f"pass a step_NNNNNNNN folder, auto or never")
    try:
        return load(path)
    except ValueError as exc:
        raise ConfigError(f"--resume {resume}: {exc}") from None


def check_fingerprint(loaded: Loaded, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another topology or model layout."""
    found = loaded.manifest.get("fingerprint", {})
    for key, value in expected.items():
        theirs = found.get(key)
        if json.loads(json.dumps(theirs)) != json.loads(json.dumps(value)):
            raise ConfigError(f"checkpoint {loaded.path} was written for {key}={theirs}, but the config gives "
                              f"{key}={value}: run with the same topology, model and plan, or --resume never")
