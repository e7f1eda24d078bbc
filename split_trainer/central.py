"""The central rank's driver: it feeds batches to the edges, keeps the central's turns in order,
and decides when to synchronise the replicas, evaluate and checkpoint.

Batch i goes to edge i mod N. One central thread per edge (a *lane*) keeps one batch in flight
on every edge, so the edges compute at once; what each batch does on its way through the plan is
``schedule.Schedule``'s business. Batches take the central's turn strictly in dispatch order
(``Turns``), which makes a run a function of its seed and config.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import checkpoint, faults, state
from .config import Config
from .data import batch_loader, crop_flip, epoch_order, index_batches
from .datasets import Source, Spec, spec_of
from .failures import JobError, Terminated, cause_of, raise_on_sigterm
from .fleet import Fleet
from .metrics import MetricsLog, Window, resident_bytes
from .optim import lr_at
from .plan import describe, plan_for
from .progress import Console
from .schedule import Batch, Schedule, Side
from .shards import Draw, rotation
from .standalone import save_model
from .topology import Topology, device_for
from .wire import TRAIN_KINDS, summary as wire_summary


class Turns:
    """Hands the central's turn to batches strictly in dispatch order; ``fail`` releases every waiter."""

    def __init__(self, first: int, timeout_s: float):
        self.next, self.timeout_s, self.failed = first, timeout_s, False
        self.cond = threading.Condition()

    def wait(self, step: int) -> None:
        with self.cond:
            ready = self.cond.wait_for(lambda: self.failed or self.next == step, self.timeout_s)
            if self.failed:
                raise JobError("aborted: another edge failed")
            if not ready:
                raise JobError(f"batch {step} waited {self.timeout_s:g} s for the central's turn")

    def done(self, step: int) -> None:
        with self.cond:
            self.next = step + 1
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class Central:
    def __init__(self, cfg: Config, topo: Topology, train: Source | None, test: Source | None, console: Console, job: str,
                 loaded: checkpoint.Loaded | None = None):
        self.cfg, self.topo, self.train_split, self.test_split, self.console = cfg, topo, train, test, console
        self.plan = plan_for(cfg, cfg.train.seed)
        self.shape = spec_of(cfg.data).shape()
        self.fingerprint = checkpoint.fingerprint(cfg, describe(self.plan.layout))
        self.job = job
        self.side = Side(self.plan.on("central"), cfg.train, device_for(cfg.train.central_device,
                                                                        "train.central_device", topo.local_rank))
        edge_side = Side(self.plan.on("edge"), cfg.train)
        self.fleet = Fleet(cfg, topo.edge_names, edge_side.state_dict())
        self.schedule = Schedule(self.plan.places, cfg.train.engine, self.side)
        self.labels_here = self.plan.places[-1] == "central"  # edge placement: the edges send labels only then
        console.attach(self.fleet.links)
        self.in_flight: list[Future] = []  # the lanes at work, one per edge
        self.pool = ThreadPoolExecutor(len(self.fleet), thread_name_prefix="edge-lane")
        self.shards = self.fleet.shards  # edge placement: what each edge holds (sizes, label counts)
        if self.shards is None:
            self.test_batches = index_batches(len(test), cfg.data.eval_batch_size)
            self.steps_per_epoch = -(-len(train) // cfg.data.batch_size)
        else:
            self.rotation = rotation([s["train_batches"] for s in self.shards])
            self.steps_per_epoch = len(self.rotation)
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.progress = state.Progress(seed=cfg.train.seed)
        self.samples, self.train_time, self.checkpoint_time = 0, 0.0, 0.0
        self.losses: dict[int, tuple[float, float]] = {}  # step -> (loss, when its turn ended)
        self.run_dir = Path(cfg.output.run_dir)
        self.resumed_from = loaded.step if loaded else None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through=self.resumed_from,
                                  tensorboard_dir=self.run_dir / "tb" if cfg.logging.tensorboard else None)
        if loaded:
            self.progress = state.restore(loaded, self.side, self.fleet)
            self.metrics.write(event="resume", step=self.step, from_checkpoint=str(loaded.path),
                               attempt=topo.restart)
            console.print(f"resumed from {loaded.path} (step {self.step}, attempt {topo.restart})")

    @property
    def step(self) -> int:
        return self.progress.step

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except Terminated as stop:
            raise cause_of(stop, self.fleet.links, self.in_flight, grace_s=min(5.0, self.cfg.rpc.timeout_s)) from None

    def _train(self) -> dict[str, Any]:
        started, window = time.perf_counter(), Window()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            lr = lr_at(self.cfg.train, epoch)
            for chunk in self._chunks(epoch):
                t0 = time.perf_counter()
                self._train_chunk(chunk, lr)
                trained = set(self.progress.trained) | {b.edge for b in chunk}
                self.progress.trained = sorted(trained)
                boundary = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if boundary or self.step % self.cfg.train.edge_sync_every == 0:
                    self.fleet.sync(trained)
                    self.progress.trained = []
                self.train_time += time.perf_counter() - t0
                self._log_chunk(chunk, window)
                paused = time.perf_counter()
                if boundary:
                    self._evaluate(epoch)
                if boundary or self.step % self.cfg.checkpoint.every_steps == 0:
                    self._checkpoint()
                window.start += time.perf_counter() - paused  # not training time
        return self._finish(time.perf_counter() - started)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        """This epoch's batches from the current position, in dispatch order."""
        start = epoch * self.steps_per_epoch
        position = self.step - start
        if self.shards is not None:  # each edge draws its own batch
            for i, (k, j) in enumerate(self.rotation[position:], position):
                yield Batch(start + i, k, draw=Draw("train", epoch, j, self.labels_here))
            return
        order = epoch_order(len(self.train_split), self.cfg.data.batch_size, self.cfg.train.seed, epoch)
        loader = batch_loader(self.train_split, order[position:], self.cfg.data.num_workers)
        for i, (x, y) in enumerate(loader, position):
            if self.cfg.data.augment == "crop_flip":
                x = crop_flip(x, self.cfg.train.seed, epoch, i)
            yield Batch(start + i, (start + i) % len(self.fleet), x, y)

    def _chunks(self, epoch: int) -> Iterator[list[Batch]]:
        """This epoch's batches cut where the edges must be quiet: at every sync, every checkpoint,
        and the end of the run."""
        chunk = []
        cuts = (self.cfg.train.edge_sync_every, self.cfg.checkpoint.every_steps)
        for batch in self._batches(epoch):
            chunk.append(batch)
            step = batch.step + 1
            if step >= self.total_steps or any(step % every == 0 for every in cuts):
                yield chunk
                chunk = []
            if step >= self.total_steps:
                return
        if chunk:
            yield chunk

    def _lanes(self, work: Callable, shares: list[list], turns: Turns | None = None) -> None:
        """``work(k, shares[k])`` for every edge k at once, one thread each; the first failure
        ends them all and is raised (the report goes out now: torchrun stops the job about 0.1 s
        after a rank dies)."""
        futures = [self.pool.submit(self._guarded, work, k, share) for k, share in enumerate(shares) if share]
        self.in_flight = futures
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            if turns is not None:
                turns.fail()
            raise min(failed, key=lambda e: e.when)  # _guarded raises JobErrors only

    def _guarded(self, work: Callable, k: int, share: list) -> None:
        try:
            work(k, share)
        except JobError:
            raise
        except Exception as exc:
            raise self.fleet.links[k].fail(exc) from exc

    def _train_chunk(self, chunk: list[Batch], lr: float) -> None:
        # A batch waits at most for the batch before it: its first call, then its turn, one call
        # per edge hop in the turn. One bound more lets a hung edge's own timeout be the report.
        edge_hops = sum(hop.place == "edge" for hop in self.schedule.route.turn)
        turns = Turns(chunk[0].step, (2 + edge_hops) * self.cfg.rpc.timeout_s)
        n = len(self.fleet)

        def lane(k: int, batches: list[Batch]) -> None:
            link = self.fleet.links[k]

            def finished(batch: Batch, loss: float) -> None:
                self.losses[batch.step] = (loss, time.perf_counter())
                link.batches += 1
                faults.hit("train")

            self.schedule.train_lane(self.fleet.edges[k], batches, turns, lr, finished)

        self._lanes(lane, [[b for b in chunk if b.edge == k] for k in range(n)], turns)
        self.progress.step = chunk[-1].step + 1

    # -- evaluation, checkpoints and records -------------------------------------------------
    def _evaluate(self, epoch: int) -> None:
        """Test loss and accuracy of the synchronised model, one test batch per edge at a time (so
        no call waits behind another on its edge): the central's test batches spread over the
        edges, or in edge placement each edge's own test shard, combined by sample count."""
        n = len(self.fleet)
        if self.shards is None:
            shares = [[(k, j, idx, None) for j, idx in enumerate(self.test_batches) if j % n == k] for k in range(n)]
        else:
            shares = [[(k, j, Draw("test", epoch, j, self.labels_here), None) for j in range(s["test_batches"])]
                      for k, s in enumerate(self.shards)]
        scores: dict[tuple[int, int], tuple[float, int, int]] = {}

        def lane(k: int, share: list) -> None:
            for _, j, source, y in share:
                if self.shards is None:  # the central's own test images, gathered (or decoded) here
                    source, y = self.test_split.batch(source)
                scores[(k, j)] = self.schedule.evaluate(self.fleet.edges[k], source, y)

        self.side.train(False)
        try:
            self._lanes(lane, shares)
        finally:
            self.side.train(True)
        ordered = [scores[kj] for kj in sorted(scores, key=lambda kj: (kj[1], kj[0]))]  # fixed: the same sums every run
        loss_sum, correct, count = (sum(s[i] for s in ordered) for i in range(3))
        self.progress.last_eval = [loss_sum / count, correct / count]
        record = {}
        if self.shards is not None:  # a weak edge must not hide behind a good average
            per_edge = [[s for (k, _), s in scores.items() if k == e] for e in range(n)]
            record["per_edge"] = {name: sum(s[1] for s in p) / max(sum(s[2] for s in p), 1)
                                  for name, p in zip(self.fleet.names, per_edge)}
        self.metrics.write(event="eval", step=self.step, epoch=epoch + 1, test_loss=self.progress.last_eval[0],
                           test_accuracy=self.progress.last_eval[1], **record)
        self.console.evaluated(epoch, *self.progress.last_eval, record.get("per_edge"))

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        self.progress.epoch, self.progress.position = divmod(self.step, self.steps_per_epoch)
        path, size = state.save(self.cfg, {"fingerprint": self.fingerprint, "job": self.job, "shape": self.shape},
                                self.side, self.fleet, self.progress)
        seconds = time.perf_counter() - started
        self.checkpoint_time += seconds
        self.metrics.write(event="checkpoint", step=self.step, seconds=round(seconds, 4), bytes=size, path=str(path))
        self.console.print(f"checkpoint step {self.step} saved: {path} ({size / 1e6:.1f} MB, {seconds:.2f} s)")

    def _log_chunk(self, chunk: list[Batch], window: Window) -> None:
        every = self.cfg.logging.every_steps
        links = self.fleet.links
        for batch in chunk:
            window.add(*self.losses.pop(batch.step), batch.samples)
            self.samples += batch.samples
            step = batch.step + 1
            if step % every == 0 or step == self.total_steps:
                loss, speed = window.take()
                epoch = batch.step // self.steps_per_epoch
                sent = sum(link.sent[k] for link in links for k in TRAIN_KINDS)
                received = sum(link.received[k] for link in links for k in TRAIN_KINDS)
                self.metrics.write(step=step, epoch=epoch + 1, loss=loss, samples_per_s=speed,
                                   bytes_sent=sent, bytes_received=received,
                                   call_ms={link.name: round(link.round_trip_ms()[0], 3) for link in links},
                                   rss_mb=self._memory_mb())
                self.console.steps(step, epoch, loss, speed)

    def _memory_mb(self) -> dict[str, float]:
        """Resident memory of every rank: flat in a healthy run (contexts and futures are released)."""
        sizes = [resident_bytes(), *self.fleet.memory_bytes()]
        return {name: round(b / 2**20, 1) for name, b in zip(["central", *self.fleet.names], sizes)}

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The one synchronised model (called after the final sync): every segment, under the full
        model's layer names."""
        return {**self.fleet.state(), **self.side.state_dict()}

    def _finish(self, wall: float) -> dict[str, Any]:
        save_model(self.run_dir / "model.pt", self.cfg.to_dict()["model"], self.shape, self.merged_state())
        test_loss, test_accuracy = self.progress.last_eval
        return {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                "test_loss": test_loss, "test_accuracy": test_accuracy,
                "wall_time_s": round(wall, 3), "train_time_s": round(self.train_time, 3),
                "samples_per_s": self.samples / max(self.train_time, 1e-9),
                "checkpoint_time_s": round(self.checkpoint_time, 3),
                "edges": len(self.fleet), "restarts": self.topo.restart, "resumed_from_step": self.resumed_from,
                "bytes": wire_summary(self.fleet.links, self.samples, self.plan.cuts)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()


def _data_line(cfg: Config, central: Central, spec: Spec) -> str:
    mean, std = (", ".join(f"{v:.4f}" for v in values) for values in (spec.mean, spec.std))
    computed = " computed from the training images" if cfg.data.name == "image_folder" and cfg.data.mean is None else ""
    what = (f"{cfg.data.name} ({spec.channels}x{spec.size}x{spec.size}, {spec.classes} classes, normalised with mean "
            f"({mean}) std ({std}){computed}{', augment ' + cfg.data.augment if cfg.data.augment != 'none' else ''})")
    if central.shards is None:
        return (f"{what} at {cfg.data.root} on the central ({len(central.train_split)} train / "
                f"{len(central.test_split)} test), inputs sent to the edges")
    shards = "; ".join(f"{name} {s['train']} train / {s['test']} test, labels {s['train_labels']}"
                       for name, s in zip(central.fleet.names, central.shards))
    how = cfg.data.partition + (f" alpha {cfg.data.dirichlet_alpha:g}" if cfg.data.partition == "dirichlet" else "")
    note = " (each edge computes its own statistics)" if computed else ""
    return f"{what}{note} on the edges ({how} shards of each edge's {cfg.data.root}): {shards}"


def _banner(cfg: Config, central: Central, threads: int, spec: Spec) -> dict[str, str]:
    edges = ", ".join(f"{link.name} (rank {i + 1}, {link.host})" for i, link in enumerate(central.fleet.links))
    return {"topology": f"central (rank 0) + {len(central.fleet)} edges: {edges}",
            "model": f"{cfg.model.name}: {describe(central.plan.layout)}; engine {cfg.train.engine}",
            "data": _data_line(cfg, central, spec),
            "settings": f"batch {cfg.data.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g}, {cfg.train.epochs} "
                        f"epochs ({central.total_steps} steps), sync every {cfg.train.edge_sync_every} steps",
            "threads": f"central {threads} on {central.side.device}; " + ", ".join(
                f"{link.name} {d['threads']} on {d['device']}" for link, d in zip(central.fleet.links,
                                                                               central.fleet.described)),
            "outputs": f"{central.run_dir} (checkpoints in {checkpoint.directory(cfg)})"}


def run_central(cfg: Config, topo: Topology, threads: int, resume: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Load data, bring RPC up, train, write the outputs, and release the edges."""
    from torch.distributed import rpc

    from .datasets import load
    from .metrics import require_tensorboard, write_json, write_text
    from .topology import init_rpc

    raise_on_sigterm()
    # Everything a user can get wrong fails here, before any RPC and before anything is written.
    console = Console(quiet=quiet)
    # In edge placement the central never opens a data set: it needs no data folder at all.
    train, test, spec = load(cfg.data) if cfg.data.placement == "central" else (None, None, spec_of(cfg.data))
    if cfg.logging.tensorboard:
        require_tensorboard()
    checkpoint.remove_stale_temporaries(checkpoint.directory(cfg))
    run_dir = Path(cfg.output.run_dir)
    job = checkpoint.job_of_run(run_dir) if topo.restart else None  # a restart resumes its own job first
    loaded = checkpoint.resolve(resume, checkpoint.directory(cfg), console.warn, job)
    if loaded:
        checkpoint.check_fingerprint(loaded, checkpoint.fingerprint(cfg, describe(plan_for(cfg, 0).layout)))
    init_rpc(topo, cfg)  # every rank got this far: an edge's own start-up checks passed
    job = job or checkpoint.start_job(run_dir)
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    central = None
    try:
        central = Central(cfg, topo, train, test, console, job, loaded)
        if central.shards is not None:
            write_json(run_dir / "partition.json", {"partition": cfg.data.partition, "seed": cfg.train.seed,
                                                    **dict(zip(central.fleet.names, central.shards))})
        console.banner(_banner(cfg, central, threads, spec), central.total_steps)
        summary = central.train()
        write_json(run_dir / "summary.json", summary)
        console.close(summary)
        central.fleet.finish()
    except BaseException:
        console.close(None)
        raise
    finally:
        if central is not None:
            central.close()
    rpc.shutdown(graceful=True)
    return summary
