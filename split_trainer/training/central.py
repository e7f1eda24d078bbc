"""The central rank's run: it cuts the placement's batches into spans between flushes, has its
placement's driver train them (training.drivers: one per placement), and decides when to
synchronise the replicas, evaluate and checkpoint.

The edges are whoever the rendezvous brought (an elastic fleet's members may change between
attempts: the membership record and checkpointing.restore say what that does).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from split_trainer.config import Config
from split_trainer.core import faults
from split_trainer.core.batch import Batch
from split_trainer.core.errors import JobError
from split_trainer.core.files import write_json, write_text
from split_trainer.data.placement import Placement
from split_trainer.model.model_file import save_model
from split_trainer.model.plan import Plan, layout_text
from split_trainer.privacy import defences
from split_trainer.records import checkpoint
from split_trainer.records.metrics import MetricsLog
from split_trainer.records.state import Progress
from split_trainer.training import checkpointing
from split_trainer.training.driver import Driver
from split_trainer.training.drivers import driver_for
from split_trainer.training.engines import central_engine
from split_trainer.training.failures import Terminated, cause_of, raise_on_sigterm
from split_trainer.training.fleet import Fleet, Membership
from split_trainer.training.live import Left, LiveFleet
from split_trainer.training.log import Reporter, TrainLog
from split_trainer.training.optim import lr_at
from split_trainer.training.stage import Stage
from split_trainer.transport.base import Transport
from split_trainer.transport.link import summary as wire_summary
from split_trainer.transport.topology import Topology, device_for


class Cadence:
    """When the edges are flushed (no batch in flight): at every replica sync (every
    train.edge_sync_every steps), every checkpoint (every checkpoint.every_steps), every epoch end
    (both), and the run's end."""

    def __init__(self, cfg: Config, steps_per_epoch: int, total_steps: int, replicas: bool = True):
        self.sync_every, self.checkpoint_every = cfg.train.edge_sync_every, cfg.checkpoint.every_steps
        if not replicas:  # nothing to average: each edge holds a segment of its own
            self.sync_every = self.checkpoint_every
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def sync(self, step: int) -> bool:
        return self.epoch_end(step) or step % self.sync_every == 0

    def checkpoint(self, step: int) -> bool:
        return self.epoch_end(step) or step % self.checkpoint_every == 0

    def flush(self, step: int) -> bool:
        return self.sync(step) or self.checkpoint(step)


class Central:
    def __init__(self, cfg: Config, topo: Topology, plan: Plan, driver: type[Driver], placement: Placement,
                 console: Reporter, meta: dict[str, Any], transport: Transport,
                 loaded: checkpoint.Loaded | None = None):
        self.cfg, self.topo, self.plan, self.placement, self.console = cfg, topo, plan, placement, console
        self.transport = transport
        self.meta = meta  # fingerprint, job and data shape: every checkpoint's manifest carries them
        torch.set_rng_state(plan.rng_after_init)  # the dropout stream continues from the weights' draw
        device = device_for(cfg.train.central_device, "train.central_device", topo.local_rank)
        self.engine = central_engine(cfg, plan.places, Stage(plan.on("central"), cfg.train, device),
                                     transport.autograd, transport.guard)
        self.stage = self.engine.stage
        fleet = LiveFleet if cfg.topology.membership == "live" else Fleet
        self.fleet = fleet(cfg, transport, transport.members(), driver.replicas)
        self.driver = driver(cfg, self.engine, self.fleet, placement)
        self.driver.prepare()
        self.fleet.welcome, self.fleet.changed = self.driver.welcome, self._changed  # a live fleet's newcomers
        self.progress, averaged = Progress(seed=cfg.train.seed), []
        if loaded:
            self.progress, averaged = checkpointing.restore(loaded, self.stage, self.fleet)
            self.fleet.newest = loaded.path
        self.placement.bind(self.fleet.reports, self.fleet.names, self.progress.served, self.progress.releases)
        self.releases = defences.Releases(self.progress.releases, Path(cfg.output.run_dir) / defences.LEDGER)
        console.attach(self.fleet.snapshots)
        # An epoch's length is fixed when the run starts: a fleet that shrinks or grows later does not change it.
        self.steps_per_epoch = self.progress.steps_per_epoch or self.placement.steps_per_epoch
        self.progress.steps_per_epoch = self.placement.steps_per_epoch = self.steps_per_epoch
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.cadence = Cadence(cfg, self.steps_per_epoch, self.total_steps, self.fleet.replicas)
        # whether any edge may train any batch of a span (the release ledger's bound)
        self.any_edge = cfg.train.dispatch == "free_first" or cfg.topology.membership == "live"
        self.train_time, self.checkpoint_time, self.sync_times = 0.0, 0.0, []
        # this process's CPU while training, and in the syncs: the central's own cost, where the edges are elsewhere
        self.train_cpu, self.sync_cpu = 0.0, 0.0
        self.run_dir = Path(cfg.output.run_dir)
        self.resumed_from = loaded.step if loaded else None
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through=self.resumed_from,
                             tensorboard_dir=self.run_dir / "tb" if cfg.logging.tensorboard else None)
        self.log = TrainLog(metrics, console, self.fleet, cfg.logging.every_steps, self.steps_per_epoch,
                            self.total_steps)
        if loaded:
            metrics.write(event="resume", step=self.step, from_checkpoint=str(loaded.path), attempt=topo.restart)
            console.print(f"resumed from {loaded.path} (step {self.step}, attempt {topo.restart})")
        before = metrics.last("membership") or ({"edges": self.progress.edges} if loaded else None)
        self.membership = Membership(before["edges"] if before else None, self.fleet.names, self.step, averaged)
        metrics.write(event="membership", attempt=topo.restart, **self.membership.record())

    @property
    def step(self) -> int:
        return self.progress.step

    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except Terminated as stop:
            raise cause_of(stop, self.fleet.snapshots, self.fleet.in_flight,
                           grace_s=min(5.0, self.cfg.rpc.timeout_s)) from None

    def _train(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.releases.start(self.step, self.placement.passes(self.step), self.progress.served,
                            resumed=self.resumed_from is not None)
        self.log.start()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            lr = lr_at(self.cfg.train, epoch)
            for span in self._spans(epoch):
                # On disk before any of the span's batches leaves an edge: a failure past the next
                # checkpoint must not take the count of what the central has seen back with it.
                self.releases.before_span(span[-1].step + 1, self.placement.passes(self.step),
                                          self.placement.reach(span, self.any_edge))
                t0, cpu0 = time.perf_counter(), time.process_time()
                trained = set(self.progress.trained) | self.driver.train_span(span, lr, self._finished)
                self.progress.step = span[-1].step + 1
                self.progress.trained = sorted(trained)
                self._membership()
                if self.cadence.sync(self.step):
                    synced, cpu = time.perf_counter(), time.process_time()
                    self._again_if_left(lambda: self.fleet.sync(trained))
                    self.sync_times.append(time.perf_counter() - synced)
                    self.sync_cpu += time.process_time() - cpu
                    self.progress.trained = []
                self.train_time += time.perf_counter() - t0
                self.train_cpu += time.process_time() - cpu0
                self.log.span(span)
                with self.log.paused():
                    if self.cadence.epoch_end(self.step):
                        self._evaluate(epoch)
                        self.log.metrics.write(event="privacy", step=self.step, epoch=epoch + 1, **self._privacy())
                    if self.cadence.checkpoint(self.step):
                        self._again_if_left(self._checkpoint)
        return self._finish(time.perf_counter() - started)

    def _membership(self) -> None:
        """At a flush: the edges that left and joined (a live fleet's)."""
        self._changed(self.fleet.refresh(self.step))

    def _changed(self, change: Optional[Membership]) -> None:
        """A change of a live fleet's members (at a flush, or a vertical party's mid-span), in
        metrics.jsonl and on the console."""
        if change is None:
            return
        self.placement.bind(self.fleet.reports, self.fleet.names, self.progress.served, self.progress.releases)
        self.placement.steps_per_epoch = self.steps_per_epoch  # fixed when the run started
        self.log.metrics.write(event="membership", attempt=self.topo.restart, **change.record())
        self.console.print(f"membership: {change.banner(self.cfg)}")

    def _again_if_left(self, flush: Callable[[], Any]) -> Any:
        """``flush()`` (a sync, an evaluation, a checkpoint: each can be done again), done again on
        the edges present when an edge of a live fleet left during it."""
        while True:
            try:
                return flush()
            except Left:
                self._membership()

    def _spans(self, epoch: int) -> Iterator[list[Batch]]:
        """This epoch's batches from the current position, cut at every flush."""
        span = []
        for batch in self.placement.batches(epoch, self.step - epoch * self.steps_per_epoch):
            span.append(batch)
            if self.cadence.flush(batch.step + 1):
                yield span
                span = []
            if batch.step + 1 >= self.total_steps:
                return
        if span:
            yield span

    def _finished(self, batch: Batch, loss: float) -> None:
        if not math.isfinite(loss):  # before anything of this step is synchronised or checkpointed
            raise JobError(f"step {batch.step + 1}: the loss of the batch from {self.driver.served_by(batch)} is {loss}: "
                           f"a non-finite value reached the central, and nothing of it is checkpointed (run the same "
                           f"command to resume from the last checkpoint)")
        self.log.finished(batch, loss)
        faults.hit("train", "central")

    def _evaluate(self, epoch: int) -> None:
        loss, accuracy, record = self._again_if_left(lambda: self.driver.evaluate(epoch))
        self.progress.last_eval = [loss, accuracy]
        self.log.metrics.write(event="eval", step=self.step, epoch=epoch + 1, test_loss=loss, test_accuracy=accuracy,
                               **record)
        self.console.evaluated(epoch, loss, accuracy, record.get("per_edge"))

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        self.progress.epoch, self.progress.position = divmod(self.step, self.steps_per_epoch)
        self.progress.edges = list(self.fleet.names)
        path, size = checkpointing.save(self.cfg, self.meta, self.stage, self.fleet, self.progress)
        self.fleet.newest = path
        seconds = time.perf_counter() - started
        self.checkpoint_time += seconds
        self.log.metrics.write(event="checkpoint", step=self.step, seconds=round(seconds, 4), bytes=size,
                               path=str(path))
        self.console.print(f"checkpoint step {self.step} saved: {path} ({size / 1e6:.1f} MB, {seconds:.2f} s)")

    def _finish(self, wall: float) -> dict[str, Any]:
        if self.driver.no_model_file:
            self.console.print(self.driver.no_model_file)
        elif self.fleet.own_weights:
            self.console.print("model.pt not written: the edge segments stay on the edges; python -m split_trainer "
                               "export --checkpoint CHECKPOINT --out model.pt merges the parts where they are at hand")
        else:  # after the final sync every replica is the same: any one gives the edge segments
            merged = {**self.fleet.state(), **self.stage.state_dict()}
            save_model(self.run_dir / "model.pt", self.cfg.to_dict()["model"], self.plan.shape, merged)
        test_loss, test_accuracy = self.progress.last_eval
        return {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                "test_loss": test_loss, "test_accuracy": test_accuracy,
                "wall_time_s": round(wall, 3), "train_time_s": round(self.train_time, 3),
                "train_cpu_s": round(self.train_cpu, 3),
                "samples_per_s": self.log.samples / max(self.train_time, 1e-9),
                "checkpoint_time_s": round(self.checkpoint_time, 3),
                "syncs": len(self.sync_times), "sync_time_s": round(sum(self.sync_times), 3),
                "sync_cpu_s": round(self.sync_cpu, 3),
                "edges": len(self.fleet), "restarts": self.topo.restart, "resumed_from_step": self.resumed_from,
                "privacy": {"edge_weights": self.cfg.privacy.edge_weights, "delta": self.cfg.privacy.delta,
                            **self._privacy()},
                "bytes": wire_summary(self.fleet.all_snapshots(), self.log.samples, self.plan.cuts)}

    def _privacy(self) -> dict[str, Any]:
        """The releases counted so far and their epsilon (per edge with edge-held data)."""
        return self.releases.report(self.cfg.privacy, per_edge=self.cfg.data.placement == "edge")

    def close(self) -> None:
        self.fleet.close()
        self.log.close()


def _banner(cfg: Config, central: Central, threads: int) -> dict[str, str]:
    links = central.fleet.links
    where = central.transport.where
    edges = ", ".join(f"{link.name} ({where(link.name)}, {link.host})" for link in links)
    membership = central.membership.banner(cfg)
    return {"topology": f"central (rank {central.topo.rank}) + {len(central.fleet)} edges: {edges}",
            **({"membership": membership} if membership else {}),
            "model": f"{cfg.model.name}: {central.driver.layout(cfg, central.plan)}; engine {central.engine.name}"
                     f"{central.engine.note}",
            "data": central.placement.banner(central.fleet.names),
            "settings": f"batch {cfg.data.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g}, {cfg.train.epochs} "
                        f"epochs ({central.total_steps} steps), "
                        + (f"sync every {cfg.train.edge_sync_every} steps" if central.fleet.replicas else
                           "no replica syncs (each party trains its own segment)"),
            "threads": f"central {threads} on {central.stage.device}; " + ", ".join(
                f"{link.name} {r['threads']} on {r['device']}" for link, r in zip(links, central.fleet.reports)),
            "privacy": defences.banner(cfg.privacy, cfg.train.epochs),
            "outputs": f"{central.run_dir} (checkpoints in {checkpoint.directory(cfg)})"}


def _is_last_step(cfg: Config, loaded: checkpoint.Loaded, placement: Placement) -> bool:
    """Whether ``loaded`` is the last step of the run ``cfg`` asks for (the same command run again
    on a finished run; more train.epochs or train.max_steps train on)."""
    per_epoch = loaded.parts["central"]["progress"].get("steps_per_epoch") or placement.steps_per_epoch
    total = per_epoch * cfg.train.epochs
    return per_epoch > 0 and loaded.step >= min(total, cfg.train.max_steps or total)


def _already_finished(cfg: Config, loaded: checkpoint.Loaded, summary: dict[str, Any], console: Reporter,
                      transport_for: Callable[[], Transport]) -> dict[str, Any]:
    """Say that the run had finished, with its figures, and release the edges (under torchrun they
    wait for the group to form); nothing is trained, evaluated or written."""
    transport = transport_for()
    transport.start()
    console.finished(loaded.step, loaded.path, summary, str(Path(cfg.output.run_dir) / "summary.json"))
    transport.finish(cfg.rpc.timeout_s)
    transport.shutdown(graceful=True)
    return summary


def _recorded_summary(cfg: Config, loaded: checkpoint.Loaded) -> Optional[dict[str, Any]]:
    """The finished run's summary.json, if it is the checkpoint's run. Without one (a run killed
    after its last checkpoint, before its outputs were written) the run is not finished: resuming
    writes model.pt and summary.json."""
    try:
        summary = json.loads((Path(cfg.output.run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == loaded.step else None


def run_central(cfg: Config, topo: Topology, plan: Plan, threads: int, transport_for: Callable[[], Transport],
                console: Reporter, resume: str = "auto") -> dict[str, Any]:
    """Load data, bring the transport up, train, write the outputs, and release the edges.
    ``transport_for`` builds the transport once the run's own checks have passed; ``console`` is
    what the person sees."""
    from split_trainer.records.metrics import require_tensorboard

    raise_on_sigterm()
    # Everything a user can get wrong fails here, before any RPC and before anything is written.
    driver = driver_for(cfg)
    placement = driver.data(cfg, plan.places[-1] == "central")  # central placement loads its data set here
    if cfg.logging.tensorboard:
        require_tensorboard()
    checkpoint.remove_stale_temporaries(checkpoint.directory(cfg))
    run_dir = Path(cfg.output.run_dir)
    agent = checkpoint.launcher()
    job = checkpoint.job_of_run(run_dir, agent)  # a restart (or a new round of an elastic fleet) resumes its own job
    loaded = checkpoint.resolve(resume, checkpoint.directory(cfg), console.warn, job)
    fingerprint = checkpoint.fingerprint(cfg, layout_text(plan.layout), driver.fingerprint(cfg))
    if loaded:
        checkpoint.check_fingerprint(loaded, fingerprint)
        summary = _recorded_summary(cfg, loaded) if _is_last_step(cfg, loaded, placement) else None
        if summary is not None:
            return _already_finished(cfg, loaded, summary, console, transport_for)
    transport = transport_for()
    transport.start()  # every rank got this far: an edge's own start-up checks passed
    job = job or checkpoint.start_job(run_dir, agent, checkpoint.directory(cfg))
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    central = None
    try:
        central = Central(cfg, topo, plan, driver, placement, console,
                          {"fingerprint": fingerprint, "job": job, "shape": plan.shape}, transport, loaded)
        for name, content in placement.files(central.fleet.names).items():
            write_json(run_dir / name, content)
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
    transport.shutdown(graceful=True)
    return summary
