"""The central rank: data, head, loss, evaluation, and the driver of the edges.

Batch i goes to edge i mod N. One central thread per edge keeps one batch in flight on every
edge, so the edges compute at once; each thread opens its own distributed-autograd context
(contexts are thread-local). The head takes batches strictly in dispatch order (``Turns``),
which makes a run a function of its seed, and it steps before the next batch's forward reads
its weights. An edge steps before its next forward for the same reason.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.autograd as dist_autograd
import torch.nn.functional as F
from torch.distributed import rpc

from . import checkpoint, edge
from .config import Config, ConfigError
from .failures import JobError, Terminated, cause_of, raise_on_sigterm
from .data import Split, batch_loader, epoch_order, eval_batches
from .metrics import MetricsLog, Window, resident_bytes
from .wire import TRAIN_KINDS, EdgeLink, nbytes, summary as wire_summary
from .models import average_states, build_plan
from .optim import lr_at, make_optimizer, step_with
from .progress import Console
from .standalone import save_model
from .topology import Topology


@dataclass
class Batch:
    step: int
    x: torch.Tensor
    y: torch.Tensor


class Turns:
    """Hands the head to batches strictly in dispatch order; ``fail`` releases every waiter."""

    def __init__(self, first: int, timeout_s: float):
        self.next, self.timeout_s, self.failed = first, timeout_s, False
        self.cond = threading.Condition()

    def wait(self, step: int) -> None:
        with self.cond:
            ready = self.cond.wait_for(lambda: self.failed or self.next == step, self.timeout_s)
            if self.failed:
                raise JobError("aborted: another edge failed")
            if not ready:
                raise JobError(f"batch {step} waited {self.timeout_s:g} s for the head (2 x rpc.timeout_s)")

    def done(self, step: int) -> None:
        with self.cond:
            self.next = step + 1
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class Central:
    def __init__(self, cfg: Config, topo: Topology, train: Split, test: Split, console: Console,
                 loaded: checkpoint.Loaded | None = None):
        self.cfg, self.topo, self.train_split, self.console = cfg, topo, train, console
        plan = build_plan(cfg.model, cfg.train.seed)
        if [s.place for s in plan.segments] != ["edge", "central"]:
            raise ConfigError(f"model {cfg.model.name} has layout {plan.layout}: this trainer runs [edge, central]")
        self.layout = plan.layout
        self.fingerprint = checkpoint.fingerprint(cfg, plan.layout)
        self.head = plan.segments[1].module
        self.head_opt = make_optimizer(cfg.train, self.head.parameters())
        initial = plan.segments[0].module.state_dict()
        self.names = topo.edge_names
        # Every replica starts from the central's seeded weights: one model, N copies.
        self.rrefs = [rpc.remote(name, edge.EdgeSegment, args=(cfg.model, cfg.train, initial))
                      for name in self.names]
        self.links = [EdgeLink(name, host) for name, host in zip(self.names, self._hosts())]
        console.attach(self.links)
        self.in_flight: list[Future] = []  # the futures of the chunk in flight, one per edge
        self.pool = ThreadPoolExecutor(len(self.names), thread_name_prefix="edge-pipeline")
        self.test_batches = eval_batches(test, cfg.data.eval_batch_size)
        self.steps_per_epoch = -(-len(train) // cfg.data.batch_size)
        total = self.steps_per_epoch * cfg.train.epochs
        self.total_steps = min(total, cfg.train.max_steps or total)
        self.step, self.samples, self.train_time, self.checkpoint_time = 0, 0, 0.0, 0.0
        self.losses: dict[int, tuple[float, float]] = {}  # step -> (loss, when the head finished it)
        self.last_eval: tuple[float, float] = (float("nan"), float("nan"))
        self.run_dir = Path(cfg.output.run_dir)
        self.checkpoint_dir = checkpoint.directory(cfg)
        self.resumed_from = loaded.step if loaded else None
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_through=self.resumed_from,
                                  tensorboard_dir=self.run_dir / "tb" if cfg.logging.tensorboard else None)
        if loaded:
            self._restore(loaded)

    def _hosts(self) -> list[str]:
        futures = [rpc.rpc_async(n, edge.describe) for n in self.names]
        return [f.wait() for f in futures]

    def _restore(self, loaded: checkpoint.Loaded) -> None:
        """Continue exactly where the checkpoint was taken: weights, optimizers, RNG, data position."""
        central = loaded.parts["central"]
        self.head.load_state_dict(central["head"])
        self.head_opt.load_state_dict(central["optimizer"])
        torch.set_rng_state(central["rng"])
        progress = central["progress"]
        self.step, self.last_eval = progress["step"], tuple(progress["last_eval"])
        self._on_edges(edge.import_state, [(r, loaded.parts[n]) for n, r in zip(self.names, self.rrefs)], "control")
        self.metrics.write(event="resume", step=self.step, from_checkpoint=str(loaded.path),
                           attempt=self.topo.restart)
        self.console.print(f"resumed from {loaded.path} (step {self.step}, attempt {self.topo.restart})")

    def _checkpoint(self) -> None:
        """Both sides' full state at a quiet point; the edges' parts travel over RPC."""
        started = time.perf_counter()
        edge_parts = self._on_edges(edge.export_state, [(r,) for r in self.rrefs], "control")
        epoch, position = divmod(self.step, self.steps_per_epoch)
        central = {"head": self.head.state_dict(), "optimizer": self.head_opt.state_dict(),
                   "rng": torch.get_rng_state(),
                   "progress": {"step": self.step, "epoch": epoch, "position": position,
                                "seed": self.cfg.train.seed, "last_eval": list(self.last_eval)}}
        meta = {"epoch": epoch, "position": position, "fingerprint": self.fingerprint, "config": self.cfg.to_dict()}
        path, size = checkpoint.save(self.checkpoint_dir, self.step, {"central": central, **dict(zip(self.names, edge_parts))},
                                     meta, self.cfg.checkpoint.keep)
        seconds = time.perf_counter() - started
        self.checkpoint_time += seconds
        self.metrics.write(event="checkpoint", step=self.step, seconds=round(seconds, 4), bytes=size, path=str(path))
        self.console.print(f"checkpoint step {self.step} saved: {path} ({size / 1e6:.1f} MB, {seconds:.2f} s)")

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except Terminated as stop:
            raise cause_of(stop, self.links, self.in_flight, grace_s=min(5.0, self.cfg.rpc.timeout_s)) from None

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
                    self._sync_edges()
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

    def _train_chunk(self, chunk: list[Batch], lr: float) -> None:
        # A batch waits at most for the batch before it: one call (bounded by rpc.timeout_s) and a
        # head step. Twice the RPC bound lets a hung edge's own timeout be the error reported.
        turns = Turns(chunk[0].step, 2 * self.cfg.rpc.timeout_s)
        lanes = [[b for b in chunk if b.step % len(self.names) == k] for k in range(len(self.names))]
        lane_fn = self._relay_lane if self.cfg.train.engine == "relay" else self._autograd_lane
        futures = [self.pool.submit(self._guarded, lane_fn, k, lane, turns, lr) for k, lane in enumerate(lanes) if lane]
        self.in_flight = futures
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            turns.fail()  # the report goes out now: torchrun stops the job about 0.1 s after a rank dies
            raise min(failed, key=lambda e: e.when)  # _guarded raises JobErrors only
        self.step = chunk[-1].step + 1

    def _guarded(self, lane_fn, k: int, lane: list[Batch], turns: Turns, lr: float) -> None:
        try:
            lane_fn(self.links[k], self.rrefs[k], lane, turns, lr)
        except JobError:
            raise
        except Exception as exc:
            raise self.links[k].fail(exc) from exc

    def _head_step(self, batch: Batch, act: torch.Tensor, turns: Turns, lr: float, ctx: int | None = None):
        """The head's turn for one batch: forward, loss, backward, step. Returns d loss / d act
        (relay), or lets distributed autograd carry it to the edge (ctx given)."""
        turns.wait(batch.step)
        loss = F.cross_entropy(self.head(act), batch.y)
        params = list(self.head.parameters())
        if ctx is not None:
            dist_autograd.backward(ctx, [loss])  # reaches the edge's segment over RPC
            grads, act_grad = dist_autograd.get_gradients(ctx), None
        else:
            act_grad, *head_grads = torch.autograd.grad(loss, [act, *params])
            grads = dict(zip(params, head_grads))
        step_with(self.head_opt, grads, lr)
        self.losses[batch.step] = (loss.item(), time.perf_counter())
        turns.done(batch.step)
        return act_grad

    @staticmethod
    def _call(link: EdgeLink, fn, args: tuple, sent: dict[str, int]) -> Any:
        """One timed call on the hot path; the reply is an activation (or None)."""
        started = time.perf_counter()
        reply = link.watch(rpc.rpc_async(link.name, fn, args=args)).wait()
        link.call(time.perf_counter() - started, sent, {"activations": nbytes(reply)})
        return reply

    def _autograd_lane(self, link: EdgeLink, rref: rpc.RRef, lane: list[Batch], turns: Turns, lr: float) -> None:
        for batch in lane:
            with dist_autograd.context() as ctx:
                act = self._call(link, edge.train_forward, (rref, batch.x), {"inputs": nbytes(batch.x)})
                self._head_step(batch, act, turns, lr, ctx)
                link.batches += 1
                # distributed autograd carried d loss / d act to the edge inside backward()
                self._call(link, edge.apply_step, (rref, ctx, lr), {"activation_grads": nbytes(act)})

    def _relay_lane(self, link: EdgeLink, rref: rpc.RRef, lane: list[Batch], turns: Turns, lr: float) -> None:
        act = self._call(link, edge.relay, (rref, lane[0].x, None, lr), {"inputs": nbytes(lane[0].x)})
        for j, batch in enumerate(lane):
            grad = self._head_step(batch, act.requires_grad_(), turns, lr)
            link.batches += 1
            # One call carries this batch's gradient and the next batch's input.
            following = lane[j + 1].x if j + 1 < len(lane) else None
            act = self._call(link, edge.relay, (rref, following, grad, lr),
                             {"inputs": nbytes(following), "activation_grads": nbytes(grad)})

    def _on_edges(self, fn, per_edge_args: list[tuple], kind: str) -> list[Any]:
        """Call ``fn`` on every edge at once (edge k gets per_edge_args[k]) and wait for all."""
        started = time.perf_counter()
        futures = [link.watch(rpc.rpc_async(link.name, fn, args=args)) for link, args in zip(self.links, per_edge_args)]
        results = []
        for link, args, fut in zip(self.links, per_edge_args, futures):
            try:
                results.append(fut.wait())
            except Exception as exc:
                raise link.fail(exc) from exc
            link.call(time.perf_counter() - started, {kind: nbytes(args)}, {kind: nbytes(results[-1])})
        return results

    def _sync_edges(self) -> None:
        """Average the replicas' parameters and buffers and push the average back."""
        if len(self.rrefs) == 1:
            return  # one replica is its own average
        average = average_states(self._on_edges(edge.get_state, [(r,) for r in self.rrefs], "control"))
        self._on_edges(edge.set_state, [(r, average) for r in self.rrefs], "control")

    # -- evaluation and records -------------------------------------------------------------
    def _evaluate(self, epoch: int) -> None:
        """Test loss and accuracy of the synchronised model, test batches spread over the edges."""
        n = len(self.names)
        futures = [self.links[j % n].watch(rpc.rpc_async(self.names[j % n], edge.infer, args=(self.rrefs[j % n], x)),
                                           " in evaluation") for j, (x, _) in enumerate(self.test_batches)]
        loss_sum, correct, count = 0.0, 0, 0
        self.head.eval()
        with torch.no_grad():
            for j, (fut, (x, y)) in enumerate(zip(futures, self.test_batches)):
                link = self.links[j % n]
                try:
                    act = fut.wait()
                except Exception as exc:
                    raise link.fail(exc, " in evaluation") from exc
                link.count({"eval": nbytes(x)}, {"eval": nbytes(act)})
                logits = self.head(act)
                loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
        self.head.train()
        self.last_eval = (loss_sum / count, correct / count)
        self.metrics.write(event="eval", step=self.step, epoch=epoch + 1,
                           test_loss=self.last_eval[0], test_accuracy=self.last_eval[1])
        self.console.evaluated(epoch, *self.last_eval)

    def _log_chunk(self, chunk: list[Batch], window: Window) -> None:
        every = self.cfg.logging.every_steps
        for batch in chunk:
            window.add(*self.losses.pop(batch.step), len(batch.y))
            self.samples += len(batch.y)
            step = batch.step + 1
            if step % every == 0 or step == self.total_steps:
                loss, speed = window.take()
                epoch = batch.step // self.steps_per_epoch
                sent = sum(link.sent[k] for link in self.links for k in TRAIN_KINDS)
                received = sum(link.received[k] for link in self.links for k in TRAIN_KINDS)
                self.metrics.write(step=step, epoch=epoch + 1, loss=loss, samples_per_s=speed,
                                   bytes_sent=sent, bytes_received=received,
                                   call_ms={link.name: round(link.round_trip_ms()[0], 3) for link in self.links},
                                   rss_mb=self._memory_mb())
                self.console.steps(step, epoch, loss, speed)

    def _memory_mb(self) -> dict[str, float]:
        """Resident memory of every rank: flat in a healthy run (contexts and futures are released)."""
        edges = self._on_edges(edge.rss, [()] * len(self.names), "control")
        return {name: round(b / 2**20, 1) for name, b in zip(["central", *self.names], [resident_bytes(), *edges])}

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The one synchronised model (called after the final sync, so any replica will do):
        edge segment + head, under the full model's layer names."""
        segment = rpc.rpc_sync(self.names[0], edge.get_state, args=(self.rrefs[0],))
        return {**segment, **{k: v.detach().clone() for k, v in self.head.state_dict().items()}}

    def _finish(self, wall: float) -> dict[str, Any]:
        save_model(self.run_dir / "model.pt", self.cfg.to_dict()["model"], self.merged_state())
        return {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                "test_loss": self.last_eval[0], "test_accuracy": self.last_eval[1],
                "wall_time_s": round(wall, 3), "train_time_s": round(self.train_time, 3),
                "samples_per_s": self.samples / max(self.train_time, 1e-9),
                "checkpoint_time_s": round(self.checkpoint_time, 3),
                "edges": len(self.names), "restarts": self.topo.restart, "resumed_from_step": self.resumed_from,
                "bytes": wire_summary(self.links, self.samples)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()


def _banner(cfg: Config, central: Central, threads: int) -> dict[str, str]:
    edges = ", ".join(f"{link.name} (rank {i + 1}, {link.host})" for i, link in enumerate(central.links))
    edge_layers = central.layout[0][1]
    return {"topology": f"central (rank 0) + {len(central.links)} edges: {edges}",
            "model": f"{cfg.model.name}, edges run {edge_layers[0]}..{edge_layers[-1]}, engine {cfg.train.engine}",
            "data": f"{cfg.data.root} ({len(central.train_split)} train / {sum(len(y) for _, y in central.test_batches)} test)",
            "settings": f"batch {cfg.data.batch_size}, {cfg.train.optimizer} lr {cfg.train.lr:g}, {cfg.train.epochs} "
                        f"epochs ({central.total_steps} steps), sync every {cfg.train.edge_sync_every} steps, "
                        f"{threads} thread(s)/rank",
            "outputs": f"{central.run_dir} (checkpoints in {central.checkpoint_dir})"}


def run_central(cfg: Config, topo: Topology, threads: int, resume: str = "auto", quiet: bool = False) -> dict[str, Any]:
    """Load data, bring RPC up, train, write the outputs, and release the edges."""
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
    loaded = checkpoint.resolve(resume, checkpoint.directory(cfg), console.warn)
    if loaded:
        checkpoint.check_fingerprint(loaded, checkpoint.fingerprint(cfg, build_plan(cfg.model, 0).layout))
    run_dir = Path(cfg.output.run_dir)
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    init_rpc(topo, cfg)
    central = None
    try:
        central = Central(cfg, topo, train, test, console, loaded)
        console.banner(_banner(cfg, central, threads), central.total_steps)
        summary = central.train()
        write_json(run_dir / "summary.json", summary)
        console.close(summary)
        for name in central.names:
            rpc.rpc_sync(name, edge.finish)
    except BaseException:
        console.close(None)
        raise
    finally:
        if central is not None:
            central.close()
    rpc.shutdown(graceful=True)
    return summary
