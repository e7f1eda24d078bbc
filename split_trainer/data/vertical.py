"""Vertically partitioned data (``data.placement: vertical``): every edge is a party that holds some
features of the same records, keyed by record id, and the central is the label party.

    image sets  each party reads the data set at its own data.root and keeps its region of every
                image (data.regions) and, to act out files that miss records, all but a seeded
                data.missing share of the records; ids are the records' numbers in each split
    csv         data.root/edge<k>/{train,test}.csv at party k: an ``id`` column, then numeric
                feature columns (standardised with that party's own training means and deviations);
                data.root/labels/{train,test}.csv (``id,label``) at the label party

Before training, the records they all hold are found by private set intersection (data.alignment),
sorted by id: the agreed order. A batch is the same records at every party: the central sends each
party a reference (split, epoch, batch), each party draws the epoch's permutation of the shared
records from the seed, as the central does for the labels. No feature leaves a party, and the
central sends no id but those every party holds.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch

from split_trainer.config import Config, ConfigError
from split_trainer.core.batch import Batch
from split_trainer.core.errors import EdgeRefusal
from split_trainer.data import alignment
from split_trainer.data.batches import epoch_order, index_batches
from split_trainer.data.datasets import LAYOUTS, Source, load, spec_of

Tensor = torch.Tensor
SPLITS = ("train", "test")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
DATA = "data"  # the release counts' one set of samples: every shared record, one pass an epoch


@dataclasses.dataclass(frozen=True)
class Aligned:
    """The central's reference to one batch of the shared records: the same records at every party."""
    split: str
    epoch: int
    index: int


def regions(cfg: Config) -> list[tuple[slice, slice]]:
    """Each party's (rows, columns) of an image: data.regions over topology.edges parties."""
    size, n = spec_of(cfg.data).size, cfg.topology.edges
    if cfg.data.regions == "quadrants":
        half = size // 2
        return [(slice(r, r + half) if r == 0 else slice(half, size), slice(0, half) if c == 0 else slice(half, size))
                for r in (0, half) for c in (0, half)]
    bounds = [round(size * k / n) for k in range(n + 1)]
    if min(b - a for a, b in zip(bounds, bounds[1:])) < 4:
        raise ConfigError(f"data.regions=bands gives each of {n} parties under 4 rows of a {size}-pixel image: "
                          f"use fewer edges")
    return [(slice(a, b), slice(0, size)) for a, b in zip(bounds, bounds[1:])]


def party_inputs(cfg: Config, party: int) -> Optional[tuple[int, ...]]:
    """One record's features at ``party`` (1..N) as the config says them; None for a table (its
    width is the party's file's)."""
    if cfg.data.name == "csv":
        return None
    rows, cols = regions(cfg)[party - 1]
    return spec_of(cfg.data).channels, rows.stop - rows.start, cols.stop - cols.start


class Records(Protocol):
    """One split of a party's records: their ids, and their features by row."""
    ids: list[str]

    def rows(self, idx: Tensor) -> Tensor: ...


class Region:
    """A party's region of an image set's records (those its copy holds)."""

    def __init__(self, source: Source, keep: Tensor, where: tuple[slice, slice]):
        self.source, self.keep, self.where = source, keep, where
        self.ids = [str(i) for i in keep.tolist()]

    def rows(self, idx: Tensor) -> Tensor:
        x, _ = self.source.batch(self.keep[idx])
        return x[:, :, self.where[0], self.where[1]].contiguous()


class Table:
    """A party's table: ids and standardised float32 features."""

    def __init__(self, ids: list[str], values: Tensor):
        self.ids, self.values = ids, values

    def rows(self, idx: Tensor) -> Tensor:
        return self.values[idx].contiguous()


def read_csv(path: Path, columns: Optional[list[str]] = None) -> tuple[list[str], list[str], Tensor]:
    """(ids, column names, values) of a CSV file whose first column is ``id`` and whose others are
    numbers (``columns``: the header it must have, when given)."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}): put the party's files as {LAYOUTS['csv']}") from None
    except (csv.Error, UnicodeDecodeError) as exc:  # a binary file, a field over the parser's limit
        raise ConfigError(f"{path}: not a CSV file of text ({str(exc).splitlines()[0][:160]})") from None
    if not lines or not lines[0] or lines[0][0].strip() != "id" or len(lines[0]) < 2:
        raise ConfigError(f"{path}: the first line must be a header that starts with an id column and names at least "
                          f"one more column")
    header = [c.strip() for c in lines[0]]
    if columns is not None and header != columns:
        raise ConfigError(f"{path}: header {','.join(header)}, expected {','.join(columns)}")
    ids, values = [], []
    for number, line in enumerate(lines[1:], 2):
        if len(line) != len(header):
            raise ConfigError(f"{path} line {number}: {len(line)} fields, the header has {len(header)}")
        try:
            row = [float(v) for v in line[1:]]
        except ValueError:
            raise ConfigError(f"{path} line {number}: a value that is not a number") from None
        bad = next((v for v in row if not math.isfinite(v) or abs(v) > FLOAT32_MAX), None)
        if bad is not None:  # one such value turns its whole column into NaN when standardised
            raise ConfigError(f"{path} line {number}: {bad!r} is no finite float32 number: fix or drop the line")
        values.append(row)
        ids.append(line[0].strip())
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: an id appears twice: ids name records, one line each")
    return ids, header, torch.tensor(values, dtype=torch.float32).reshape(len(ids), len(header) - 1)


def _tables(folder: Path) -> dict[str, Table]:
    """A party's train and test tables, standardised with its own training statistics."""
    (train_ids, header, train), (test_ids, _, test) = read_csv(folder / "train.csv"), read_csv(folder / "test.csv")
    if test.shape[1] != train.shape[1]:
        raise ConfigError(f"{folder}: test.csv has {test.shape[1]} feature columns, train.csv {len(header) - 1}")
    mean, std = train.mean(0), train.std(0).nan_to_num(1.0).clamp_min(1e-6)
    return {"train": Table(train_ids, (train - mean) / std), "test": Table(test_ids, (test - mean) / std)}


def kept(n: int, missing: float, seed: int, party: int) -> Tensor:
    """The records party ``party``'s copy of an image set holds: all but a seeded ``missing`` share."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 104_729 * party)
    return torch.randperm(n, generator=gen)[round(missing * n):].sort().values


def _prefixed(ids: dict[str, list[str]]) -> list[str]:
    """Every record's id, prefixed by its split: a train and a test record may share an id."""
    return [f"{split}:{rid}" for split in SPLITS for rid in ids[split]]


class PartyData:
    """A party's side (an edge's EdgeSide): its records, its answer to the alignment, and the
    features of the shared records a reference names."""
    calls = ("psi_answer", "align")  # the label party's alignment, answered on the party (data.alignment)

    def __init__(self, party: int, records: dict[str, Records], cfg: Config):
        self.number, self.records, self.cfg = party, records, cfg.data
        self.seed = cfg.train.seed
        if not records["train"].ids:
            raise ConfigError(f"party edge{party} holds no training record: check its files at its data.root")
        self.shape = tuple(records["train"].rows(torch.arange(1)).shape[1:])
        self.shared: dict[str, Tensor] = {}  # split -> rows of the shared records, in the agreed order
        self._order: tuple[int, list[Tensor]] | None = None
        self.position = (0, 0)
        self.answered = self.aligned = False  # this run's one PSI answer and one list of shared records

    @property
    def party(self) -> tuple[int, tuple[int, ...]]:
        """(party number, one record's feature shape): what its first segment is built for."""
        return self.number, self.shape

    def psi_answer(self, request: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """This party's PSI answer, once per run, to a request of at most data.psi_max_ratio ids per
        id it holds: every id asked is a guess the answer confirms or denies."""
        if self.answered:
            raise EdgeRefusal(f"party edge{self.number} answers one alignment request per run, and has answered one")
        self.answered = True
        own = _prefixed({s: self.records[s].ids for s in SPLITS})
        asked, most = alignment.request_size(request), int(self.cfg.psi_max_ratio * len(own))
        if asked != count:
            raise EdgeRefusal(f"party edge{self.number} refuses an alignment request of {asked:,} ids that claims "
                              f"{count:,}")
        if asked > most:
            raise EdgeRefusal(f"party edge{self.number} refuses an alignment request of {asked:,} ids: it answers at "
                              f"most data.psi_max_ratio={self.cfg.psi_max_ratio:g} x the {len(own):,} it holds "
                              f"({most:,})")
        return alignment.answer(own, request, asked)

    def align(self, ids: Tensor) -> None:
        """Take the shared records (their prefixed ids, in the agreed order), once, after this party's
        own PSI answer; refuse the whole list, without saying which, if it names a record this party
        does not hold (a PSI false positive, another run's list, or a probe)."""
        if not self.answered or self.aligned:
            raise EdgeRefusal(f"party edge{self.number} takes the shared records once per run, after its own PSI "
                              f"answer")
        self.aligned = True
        rows = {split: {rid: i for i, rid in enumerate(self.records[split].ids)} for split in SPLITS}
        shared: dict[str, list[int]] = {split: [] for split in SPLITS}
        for pid in alignment.decode_ids(ids):
            split, _, rid = pid.partition(":")
            if rid not in rows.get(split, {}):
                raise RuntimeError(f"party {self.number} was asked to train on a record it does not hold: align again "
                                   f"(restart the run)")
            shared[split].append(rows[split][rid])
        self.shared = {split: torch.tensor(rows_, dtype=torch.long) for split, rows_ in shared.items()}

    def inputs(self, ref: Aligned) -> tuple[Tensor, None, None]:
        if ref.split == "test":
            idx = index_batches(len(self.shared["test"]), self.cfg.eval_batch_size)[ref.index]
        else:
            if self._order is None or self._order[0] != ref.epoch:
                self._order = (ref.epoch, epoch_order(len(self.shared["train"]), self.cfg.batch_size, self.seed,
                                                      ref.epoch))
            idx = self._order[1][ref.index]
            self.position = (ref.epoch, ref.index + 1)
        return self.records[ref.split].rows(self.shared[ref.split][idx]), None, None

    def state(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "next_batch": self.position[1], "party": self.number,
                **{f"{split}_samples": len(self.shared.get(split, ())) for split in SPLITS}}

    def load_state(self, saved: dict[str, Any]) -> None:
        now = self.state()
        for key in ("party", "train_samples", "test_samples"):
            if saved.get(key) != now[key]:
                raise RuntimeError(f"party {self.number}: {key.replace('_', ' ')} {now[key]} now, {saved.get(key)} in "
                                   f"the checkpoint: the parties' records changed; resume with the same data")
        self.position = (saved.get("epoch", 0), saved.get("next_batch", 0))

    def held(self) -> dict[str, Any]:
        """What the banner says of this party: how many records it holds, and their feature shape."""
        return {"train": len(self.records["train"].ids), "test": len(self.records["test"].ids),
                "features": list(self.shape)}


class VerticalData:
    """The label party's side (the central's Placement): the labels by id, the alignment, the
    epoch's batches of shared records, and what the banner and alignment.json say."""

    def __init__(self, cfg: Config, labels_here: bool):
        self.cfg = cfg
        self.spec = spec_of(cfg.data)
        if cfg.data.name == "csv":
            tables = {split: read_csv(Path(cfg.data.root).expanduser() / "labels" / f"{split}.csv", ["id", "label"])
                      for split in SPLITS}
            self.ids = {split: t[0] for split, t in tables.items()}
            classes = cfg.data.num_classes
            for split, (_, _, values) in tables.items():
                labels = values[:, 0]
                if ((labels != labels.round()) | (labels < 0) | (labels >= classes)).any():
                    raise ConfigError(f"{cfg.data.root}/labels/{split}.csv: labels must be whole numbers "
                                      f"0..{classes - 1} (data.num_classes={classes})")
            self.labels = {split: t[2][:, 0].long() for split, t in tables.items()}
        else:  # the simulation reads the whole set; the label party keeps only the labels
            train, test, _ = load(cfg.data)
            self.labels = {"train": train.labels, "test": test.labels}
            self.ids = {split: [str(i) for i in range(len(self.labels[split]))] for split in SPLITS}
        self.shared: dict[str, Tensor] = {}
        self.agreed: Optional[Tensor] = None  # the shared records' ids, as every party took them
        self.steps_per_epoch = 0
        self.parties: list[dict[str, Any]] = []  # what each party holds (PartyData.held)
        self.releases: dict[str, int] = {}
        self.seconds = 0.0  # the alignment's wall time

    def align(self, fleet: Any) -> None:
        """Find the records every party holds (data.alignment), tell each party, keep their labels' rows."""
        started = time.perf_counter()
        client = alignment.Client(_prefixed(self.ids))
        n = len(fleet)
        answers = fleet.on_all("psi_answer", [(client.request, len(client.ids))] * n, "alignment")
        shared = alignment.intersect(client, answers)
        self.agreed = alignment.encode_ids(shared)
        fleet.on_all("align", [(self.agreed,)] * n, "alignment")
        rows = {split: {rid: i for i, rid in enumerate(self.ids[split])} for split in SPLITS}
        by_split: dict[str, list[int]] = {split: [] for split in SPLITS}
        for pid in shared:
            split, _, rid = pid.partition(":")
            by_split[split].append(rows[split][rid])
        self.shared = {split: torch.tensor(r, dtype=torch.long) for split, r in by_split.items()}
        if len(self.shared["train"]) == 0 or len(self.shared["test"]) == 0:
            raise ConfigError("the parties share no training or no test record with the label party: check that "
                              "their files name the same ids")
        self.steps_per_epoch = -(-len(self.shared["train"]) // self.cfg.data.batch_size)
        self.seconds = time.perf_counter() - started

    def realign(self, link: Any) -> None:
        """A party back in a live fleet takes the shared records again: its own PSI answer first
        (as at the start), then the list the fleet agreed on, which it refuses if it no longer holds
        every record of it."""
        client = alignment.Client(_prefixed(self.ids))
        link.call("psi_answer", (client.request, len(client.ids)), "alignment")
        link.call("align", (self.agreed,), "alignment")

    def bind(self, reports: list[dict[str, Any]], names: list[str], served: dict[str, int],
             releases: dict[str, int]) -> None:
        self.parties, self.releases = [r["shard"] for r in reports], releases

    def batches(self, epoch: int, position: int) -> Iterator[Batch]:
        start = epoch * self.steps_per_epoch
        order = epoch_order(len(self.shared["train"]), self.cfg.data.batch_size, self.cfg.train.seed, epoch)
        for i in range(position, len(order)):
            y = self.labels["train"][self.shared["train"][order[i]]]
            yield Batch(start + i, 0, Aligned("train", epoch, i), y, len(y))

    def assign(self, batch: Batch) -> Batch:
        if batch.step % self.steps_per_epoch == 0:  # an epoch is one pass over the shared records
            self.releases[DATA] = self.releases.get(DATA, 0) + 1
        return batch

    def passes(self, step: int) -> dict[str, tuple[int, int]]:
        return {DATA: (step, self.steps_per_epoch)}

    def reach(self, span: list[Batch], any_edge: bool) -> dict[str, int]:
        return {DATA: len(span)}

    def test_batches(self) -> list[tuple[Aligned, Tensor]]:
        """Every test batch of the shared records: (the parties' reference, its labels)."""
        batches = index_batches(len(self.shared["test"]), self.cfg.data.eval_batch_size)
        return [(Aligned("test", 0, j), self.labels["test"][self.shared["test"][idx]]) for j, idx in enumerate(batches)]

    def eval_record(self, scores: Any, names: list[str]) -> dict[str, Any]:
        return {}

    def counts(self, names: list[str]) -> dict[str, Any]:
        """Records per party and split, the label party's, and those all share (alignment.json)."""
        return {"label_party": {s: len(self.ids[s]) for s in SPLITS},
                **{name: {s: d[s] for s in SPLITS} for name, d in zip(names, self.parties)},
                "shared": {s: len(self.shared[s]) for s in SPLITS}}

    def banner(self, names: list[str]) -> str:
        counts = self.counts(names)
        held = "; ".join(f"{name} {counts[name]['train']:,} train / {counts[name]['test']:,} test, features "
                         f"{'x'.join(map(str, d['features']))}" for name, d in zip(names, self.parties))
        label = counts["label_party"]
        what = f"{self.cfg.data.name} ({self.cfg.data.regions} of each image)" if self.cfg.data.name != "csv" else "csv"
        return (f"{what}, vertical: {held}; labels on the central {label['train']:,} / {label['test']:,}; shared by "
                f"all (PSI, {self.seconds:.1f} s): {counts['shared']['train']:,} train / {counts['shared']['test']:,} test "
                f"records")

    def files(self, names: list[str]) -> dict[str, Any]:
        return {"alignment.json": {"method": "private set intersection (openmined-psi, ECDH, GCS setup)",
                                   "seconds": round(self.seconds, 3), "records": self.counts(names)}}

    @staticmethod
    def load_on_edge(cfg: Config, edges: list[int]) -> Any:
        """The data at this process's data.root of the parties ``edges`` (edge numbers): the whole
        image set (each party's region and records are taken once the central's config has
        arrived), or each party's tables, read and checked here, before RPC."""
        if cfg.data.name == "csv":
            return {k: _tables(Path(cfg.data.root).expanduser() / f"edge{k}") for k in edges}
        return load(dataclasses.replace(cfg.data, limit_train=None, limit_test=None))

    @staticmethod
    def edge_data(cfg: Config, loaded: Any, edge: int) -> PartyData:
        if loaded is None:
            raise RuntimeError("this edge loaded no data: start it with data.placement=vertical, as the central")
        if cfg.data.name == "csv":
            return PartyData(edge, loaded[edge], cfg)
        where = regions(cfg)[edge - 1]
        records = {}
        for split, source, limit in zip(SPLITS, loaded[:2], (cfg.data.limit_train, cfg.data.limit_test)):
            n = len(source) if limit is None else min(limit, len(source))
            records[split] = Region(source, kept(n, cfg.data.missing, cfg.train.seed + SPLITS.index(split), edge),
                                    where)
        return PartyData(edge, records, cfg)

