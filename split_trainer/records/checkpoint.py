"""Checkpoints of both sides, written by the central, one folder per step.

A checkpoint is written into a hidden temporary folder, every file fsynced, a manifest (sizes
and SHA-256 of every file) written last, and the folder renamed to ``step_<N>``: a folder with
that name and a manifest that matches its files is complete, and nothing else counts. A kill
at any moment therefore leaves the newest complete checkpoint loadable. Newest is by job, then
step (the job's generation leads its id), never by a clock. Files are read back with
``torch.load(weights_only=True)``, so a checkpoint can never run code, and only when every entry
of their archive is stored as it is, so a small file cannot inflate to a large one.

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
from typing import Any, Callable, Optional

import torch

from split_trainer.config import Config, ConfigError
from split_trainer.core import faults
from split_trainer.core.errors import JobError
from split_trainer.core.files import atomic_write
from split_trainer.core.tensors import load_weights

PATTERN = re.compile(r"^step_(\d{8})$")
PART = re.compile(r"[A-Za-z0-9_-]+\.pt")
"""A file a manifest may name (fullmatch): a plain name inside its folder, no separator, no ``..``."""
EDGE = re.compile(r"edge[1-9][0-9]*")
"""An edge part a manifest may name (fullmatch): an edge's name, edgeK, as topology gives it."""
MANIFEST = "manifest.json"
JOB = "job.json"
GENERATION = re.compile(r"(\d{6})-[0-9a-f]{32}")
"""A job id: its generation in the run folder, then a random part (``start_job``)."""


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


def complete_candidates(directory: Path, warn: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Checkpoint folders whose manifest is well formed and whose files are all there at their
    sizes (hashes not yet verified), newest first. Newest is by job, then step, never by a clock:
    a run started over in the same folder (``--resume never``) counts from step 0 again as a later
    job (``generation``), and its checkpoints are the ones to keep. A folder that is not such a
    checkpoint is skipped (said through ``warn``) and never counts, so it is never pruned either."""
    if not directory.is_dir():
        return []
    ranked = []
    for path in directory.iterdir():
        if PATTERN.match(path.name) and (path / MANIFEST).is_file():
            try:
                ranked.append((_rank(path), path))
            except ValueError as exc:
                if warn is not None:
                    warn(f"skipping checkpoint {exc}")
    return [path for _, path in sorted(ranked, reverse=True)]


def _rank(path: Path) -> tuple[int, int]:
    """(generation, step) of a checkpoint folder; ValueError if its manifest is malformed, names
    another step than the folder's, or lists a file that is missing or of another size."""
    manifest = _manifest(path)
    if manifest["step"] != int(PATTERN.match(path.name).group(1)):
        raise ValueError(f"{path}: {MANIFEST} says step {manifest['step']}, the folder another")
    if not manifest["files"]:
        raise ValueError(f"{path}: {MANIFEST} lists no file")
    _check_files(path, manifest)
    return generation(manifest.get("job")), manifest["step"]


def generation(job: Any) -> int:
    """A job's place among the jobs of one run folder, which its id starts with (``start_job``);
    0 for an id without one (a checkpoint of an older version)."""
    found = GENERATION.fullmatch(job) if isinstance(job, str) else None
    return int(found.group(1)) if found else 0


def load(path: Path) -> Loaded:
    """Load and verify one checkpoint folder; raise ValueError saying what is wrong."""
    manifest = _manifest(path)
    _check_files(path, manifest)
    parts = {}
    for name, info in manifest["files"].items():
        file = path / name
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"{file}: {exc.strerror}") from None
        if _sha256(data) != info["sha256"]:
            raise ValueError(f"{file}: altered (its SHA-256 does not match the manifest)")
        parts[name.removesuffix(".pt")] = load_weights(data, str(file))  # runs no code, inflates nothing
    return Loaded(path, manifest, parts)


def _check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is a regular file of its size (known before reading: a link
    would read outside the folder, a FIFO would block, a part of another size is not read)."""
    for name, info in manifest["files"].items():
        try:
            found = (path / name).lstat()  # the name itself: a link is not followed
        except FileNotFoundError:
            raise ValueError(f"{path / name}: missing") from None
        except OSError as exc:
            raise ValueError(f"{path / name}: {exc.strerror}") from None
        if not stat.S_ISREG(found.st_mode):
            raise ValueError(f"{path / name}: not a regular file (a link out of the folder?): refused, nothing read")
        if found.st_size != info["bytes"]:
            raise ValueError(f"{path / name}: {found.st_size} bytes, expected {info['bytes']} (truncated)")


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
    for path in complete_candidates(directory, warn):
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


def job_of_run(run_dir: Path, agent: str | None) -> str | None:
    """The id of the job that this run folder's torchrun agent ``agent`` started (any agent's,
    when None), if any: a restart or a new round finds its own job by it."""
    try:
        job = json.loads((run_dir / JOB).read_text())
        return job["id"] if agent is None or job.get("launcher") == agent else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def start_job(run_dir: Path, agent: str, directory: Path) -> str:
    """A new job: a fresh id that its checkpoints carry, so that its restarts find their own. It
    starts with the job's generation, one more than any job's before it in this run folder (its
    ``job.json``) or checkpoint folder ``directory``: newest is by generation, then step."""
    before = [job_of_run(run_dir, None)] + [manifest_field(p, "job") for p in directory.glob("step_*")]
    job = f"{1 + max(map(generation, before)):06d}-{uuid.uuid4().hex}"
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
