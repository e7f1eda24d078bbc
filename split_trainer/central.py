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
from .data import Split, batch_loader, epoch_order, eval_batches
from .failures import JobError, Terminated, cause_of, raise_on_sigterm
from .fleet import Fleet
from .metrics import MetricsLog, Window, resident_bytes
from .optim import lr_at
from .plan import build_plan, describe
from .progress import Console
from .schedule import Batch, Schedule, Side
from .standalone import save_model
from .topology import Topology
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
    def __init__(self, cfg: Config, topo: Topology, train: Split, test: Split, console: Console, job: str,
                 loaded: checkpoint.Loaded | None = None):
        self.cfg, self.topo, self.train_split, self.console = cfg, topo, train, console
        self.plan = build_plan(cfg.model, cfg.train.seed)
        self.fingerprint = checkpoint.fingerprint(cfg, describe(self.plan.layout))
        self.job = job
        self.side = Side(self.plan.on("central"), cfg.train)
        edge_side = Side(self.plan.on("edge"), cfg.train)
        self.fleet = Fleet(cfg, topo.edge_names, edge_side.state_dict())
        self.schedule = Schedule(self.plan.places, cfg.train.engine, self.side)
        console.attach(self.fleet.links)
        self.in_flight: list[Future] = []  # the lanes at work, one per edge
        self.pool = ThreadPoolExecutor(len(self.fleet), thread_name_prefix="edge-lane")
        self.test_batches = eval_batches(test, cfg.data.eval_batch_size)
        self.steps_per_epoch = -(-len(train) // cfg.data.batch_size)
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
                boundary = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if boundary or self.step % self.cfg.train.edge_sync_every == 0:
                    self.fleet.sync()
                self.train_time += time.perf_counter() - t0
                self._log_chunk(chunk, window)
                paused = time.perf_counter()
                if boundary:
                    self._evaluate(epoch)
                if boundary or self.step % self.cfg.checkpoint.every_steps == 0:
                    self._checkpoint()
                window.start += time.perf_counter() - paused  # not training time
        return self._finish(time.perf_counter() - started)

    def _chunks(self, epoch: int) -> Iterator[list[Batch]]:
        """This epoch's batches from the current position, cut where the edges must be quiet:
        at every sync, every checkpoint, and the end of the run."""
        order = epoch_order(len(self.train_split), self.cfg.data.batch_size, self.cfg.train.seed, epoch)
        position = self.step - epoch * self.steps_per_epoch
        loader = batch_loader(self.train_split, order[position:], self.cfg.data.num_workers)
        chunk, step = [], self.step
        cuts = (self.cfg.train.edge_sync_every, self.cfg.checkpoint.every_steps)
        for x, y in loader:
            chunk.append(Batch(step, x, y))
            step += 1
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

        self._lanes(lane, [[b for b in chunk if b.step % n == k] for k in range(n)], turns)
        self.progress.step = chunk[-1].step + 1

    # -- evaluation, checkpoints and records -------------------------------------------------
    def _evaluate(self, epoch: int) -> None:
        """Test loss and accuracy of the synchronised model; each edge takes every n-th test batch,
        one at a time, so no call waits behind another on its edge."""
        n = len(self.fleet)
        scores: dict[int, tuple[float, int]] = {}

        def lane(k: int, indices: list[int]) -> None:
            for j in indices:
                x, y = self.test_batches[j]
                scores[j] = self.schedule.evaluate(self.fleet.edges[k], x, y)

        self.side.train(False)
        try:
            self._lanes(lane, [list(range(k, len(self.test_batches), n)) for k in range(n)])
        finally:
            self.side.train(True)
        count = sum(len(y) for _, y in self.test_batches)
        loss_sum = sum(scores[j][0] for j in range(len(self.test_batches)))  # in order: the same sum every run
        correct = sum(scores[j][1] for j in range(len(self.test_batches)))
        self.progress.last_eval = [loss_sum / count, correct / count]
        self.metrics.write(event="eval", step=self.step, epoch=epoch + 1,
                           test_loss=self.progress.last_eval[0], test_accuracy=self.progress.last_eval[1])
        self.console.evaluated(epoch, *self.progress.last_eval)

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        self.progress.epoch, self.progress.position = divmod(self.step, self.steps_per_epoch)
        path, size = state.save(self.cfg, {"fingerprint": self.fingerprint, "job": self.job}, self.side,
                                self.fleet, self.progress)
        seconds = time.perf_counter() - started
        self.checkpoint_time += seconds
        self.metrics.write(event="checkpoint", step=self.step, seconds=round(seconds, 4), bytes=size, path=str(path))
        self.console.print(f"checkpoint step {self.step} saved: {path} ({size / 1e6:.1f} MB, {seconds:.2f} s)")

    def _log_chunk(self, chunk: list[Batch], window: Window) -> None:
        every = self.cfg.logging.every_steps
        links = self.fleet.links
        for batch in chunk:
            window.add(*self.losses.pop(batch.step), len(batch.y))
            self.samples += len(batch.y)
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
        save_model(self.run_dir / "model.pt", self.cfg.to_dict()["model"], self.merged_state())
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


def _banner(cfg: Config, central: Central, threads: int) -> dict[str, str]:
    edges = ", ".join(f"{link.name} (rank {i + 1}, {link.host})" for i, link in enumerate(central.fleet.links))
    return {"topology": f"central (rank 0) + {len(central.fleet)} edges: {edges}",
            "model": f"{cfg.model.name}: {describe(central.plan.layout)}; engine {cfg.train.engine}",
            "data": f"{cfg.data.root} ({len(central.train_split)} train / {sum(len(y) for _, y in central.test_batches)} test)",
            "settings": f"batch {cfg.data.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g}, {cfg.train.epochs} "
                        f"epochs ({central.total_steps} steps), sync every {cfg.train.edge_sync_every} steps, "
                        f"{threads} thread(s)/rank",
            "outputs": f"{central.run_dir} (checkpoints in {checkpoint.directory(cfg)})"}


def run_central(cfg: Config, topo: Topology, threads: int, resume: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Load data, bring RPC up, train, write the outputs, and release the edges."""
    from torch.distributed import rpc

    from .data import load_mnist
    from .metrics import require_tensorboard, write_json, write_text
    from .topology import init_rpc

    raise_on_sigterm()
    # Everything a user can get wrong fails here, before any RPC and before anything is written.
    console = Console(quiet=quiet)
    train, test = load_mnist(cfg.data)
    if cfg.logging.tensorboard:
        require_tensorboard()
    checkpoint.remove_stale_temporaries(checkpoint.directory(cfg))
    run_dir = Path(cfg.output.run_dir)
    job = checkpoint.job_of_run(run_dir) if topo.restart else None  # a restart resumes its own job first
    loaded = checkpoint.resolve(resume, checkpoint.directory(cfg), console.warn, job)
    if loaded:
        checkpoint.check_fingerprint(loaded, checkpoint.fingerprint(cfg, describe(build_plan(cfg.model, 0).layout)))
    job = job or checkpoint.start_job(run_dir)
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    init_rpc(topo, cfg)
    central = None
    try:
        central = Central(cfg, topo, train, test, console, job, loaded)
        console.banner(_banner(cfg, central, threads), central.total_steps)
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
