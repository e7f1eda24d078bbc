"""The engines: how a batch's gradients reach every segment. Two implementations of one interface,
each with both ends: how a stage runs a training hop (``run``), and how the central drives one
edge's batches through their route (``drive``).

``relay``: each stage backprops its segment from the gradient it receives, steps at once and hands
the input gradient across the cut; the edge's first segment steps when its next call arrives.
``autograd``: the forwards keep their graphs, one autograd context per batch spans every cut
(distributed autograd over RPC, ordinary autograd on loopback: the transport's ``Autograd``), its
backward carries the gradients back, and each side steps from the context. Both give the same
gradients on the same batches.

Batches take the central's turn strictly in dispatch order (``Turns``), so every batch sees the
central's weights after the previous batch's step, whichever edge it went to; under free_first in
the order they become ready (``FirstCome``), still one at a time.

``local`` (train.edge_loss: local) is not a way to the same gradients but another objective: the
edge's first segment learns from its own auxiliary head (training.local_loss), the central from its
loss on what arrives, and nothing crosses back.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from split_trainer.config import TrainConfig
from split_trainer.privacy.defences import Defences
from split_trainer.training.dispatch import Turns
from split_trainer.training.optim import step_with
from split_trainer.training.local_loss import EdgeHead
from split_trainer.training.route import Batch, Hop, Route, autograd_route, eval_route, local_route, relay_route
from split_trainer.training.stage import Stage
from split_trainer.transport.wire import Reply

Tensor = torch.Tensor


class EdgeCalls(Protocol):
    """The central's link to one edge (split_trainer.transport.link.Link)."""

    def run(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float,
            evaluating: bool = False) -> Reply: ...

    def submit(self, work: list[tuple[Hop, Any]], labels: Optional[Tensor], lr: float) -> Callable[[], Reply]: ...

    def step(self, context_id: int, lr: float) -> None: ...


Finished = Callable[[Batch, float], None]
Batches = Iterable[Batch]  # one edge's batches, each assigned when its driver thread gets to it (dispatch.py)


class Engine:
    """One stage's engine: the central's (which also drives the edges' batches) or an edge replica's."""
    name = ""

    def __init__(self, places: list[str], stage: Stage, in_flight: int = 1, defences: Optional[Defences] = None,
                 autograd: Any = None, guard: Callable[[], AbstractContextManager] = nullcontext,
                 head: Optional[EdgeHead] = None):
        self.stage, self.in_flight, self.defences = stage, in_flight, defences
        self.head = head  # the edge's auxiliary head: the local engine's, on the edge
        self.autograd = autograd  # the transport's (transport.base.Autograd): used by the autograd engine
        self.guard = guard  # held around this stage's own compute on the central (transport.base.Transport.guard)
        self.route: Route = self.route_for(places)
        self.eval_hops = eval_route(places)

    @staticmethod
    def route_for(places: list[str]) -> Route:
        raise NotImplementedError

    def run(self, hop: Hop, x: Optional[Tensor], labels: Optional[Tensor], lr: float) -> Reply:
        """Run one hop on this stage. Inputs come from the wire on the CPU and move to the stage's
        device; outputs stay there (the wire moves them)."""
        x, labels = self.stage.here(x), self.stage.here(labels)
        if hop.kind == "infer":
            return Reply(output=self.outgoing(hop, x, self.stage.infer(hop.segment, x)))
        if hop.kind == "score":
            return Reply(score=self.stage.score(hop.segment, x, labels))
        return self.train_hop(hop, x, labels, lr)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        raise NotImplementedError

    def incoming(self, hop: Hop, x: Tensor) -> Tensor:
        return x if self.defences is None else self.defences.incoming(hop, x)

    def outgoing(self, hop: Hop, inputs: Tensor, out: Tensor) -> Tensor:
        return out if self.defences is None else self.defences.outgoing(hop, inputs, out)

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        """One edge's share of a span, in order; ``finished(batch, loss)`` after each batch's turn."""
        raise NotImplementedError

    def step_from_context(self, context_id: int, lr: float) -> None:
        """Step every segment of this stage with an autograd context's gradients."""
        grads = self.autograd.gradients(context_id)
        for optimizer in self.stage.optimizers.values():
            step_with(optimizer, grads, lr)

    @staticmethod
    def arrived(batch: Batch, reply: Reply) -> tuple[Batch, Tensor]:
        """The reply to a batch's first forward: the batch as the central now knows it (its sample
        count; in edge placement its labels, when the loss is on the central; under a local loss the
        edge's), and its cut activation."""
        y = reply.labels if reply.labels is not None else batch.y
        return dataclasses.replace(batch, y=y, samples=len(reply.output), edge_loss=reply.loss), reply.output

    def turn(self, edge: EdgeCalls, batch: Batch, tensor: Tensor, lr: float) -> tuple[Optional[Tensor], Any]:
        """The central's turn: its hops here, the edge's hops between them as one call each.
        Returns the tensor the last hop handed on, and the batch's loss."""
        loss = None
        for hop in self.route.turn:
            if hop.place == "central":
                with self.guard():
                    reply = self.run(hop, tensor, batch.y, lr)
            else:
                reply = edge.run([(hop, tensor)], batch.y if hop.needs_labels else None, lr)
            tensor, loss = reply.output, reply.loss if reply.loss is not None else loss
        return tensor, loss

    def evaluate(self, edge: EdgeCalls, source: Any, y: Optional[Tensor]) -> tuple[float, int, int]:
        """(summed loss, correct predictions, samples) of one test batch through the whole plan, no
        grad. ``source``: the inputs, or a reference to the edge's own test batch (then ``y`` is None
        and the edge sends the labels only if the loss is on the central)."""
        tensor, score = source, None
        for hop in self.eval_hops:
            if hop.place == "central":
                reply = self.run(hop, tensor, y, 0.0)
            else:
                reply = edge.run([(hop, tensor)], y if hop.needs_labels else None, 0.0, evaluating=True)
                y = reply.labels if reply.labels is not None else y
            tensor, score = reply.output, reply.score
        return score


class Relay(Engine):
    name = "relay"
    route_for = staticmethod(relay_route)

    def __init__(self, places: list[str], stage: Stage, in_flight: int = 1, defences: Optional[Defences] = None,
                 autograd: Any = None, guard: Callable[[], AbstractContextManager] = nullcontext,
                 head: Optional[EdgeHead] = None):
        super().__init__(places, stage, in_flight, defences, autograd, guard, head)
        # segment -> the forwards awaiting their gradient, oldest first: (input, output, stashed weights)
        self.pending: dict[int, deque[tuple[Tensor, Tensor, Optional[list[Tensor]]]]] = defaultdict(deque)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        if hop.kind == "backward":  # x is the gradient of the segment's output
            inputs, out, stash = self.pending[hop.segment].popleft()
            return Reply(output=self.stage.backprop(hop.segment, out, x, inputs, lr, stash))
        x = x.detach().requires_grad_(hop.segment > 0)
        module, stash, inputs = self.stage.modules[hop.segment], None, self.incoming(hop, x)
        if hop == self.route.first and self.in_flight > 1:
            # Another batch steps these weights before this one's gradient comes back: keep the
            # weights this forward saw (weight stashing), take the gradient there, apply it to the
            # current ones. Stepping in place under a pending graph would break its backward.
            names = [name for name, _ in module.named_parameters()]
            stash = [p.detach().clone().requires_grad_() for p in module.parameters()]
            out = torch.func.functional_call(module, dict(zip(names, stash)), (inputs,))
        else:
            out = module(inputs)
        out = self.outgoing(hop, x, out)
        if hop.kind == "forward":
            self.pending[hop.segment].append((x, out, stash))
            return Reply(output=out.detach())
        loss = self.stage.loss(out, labels)  # turnaround
        return Reply(output=self.stage.backprop(hop.segment, loss, None, x, lr), loss=loss.item())

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        """Up to ``in_flight`` first forwards ahead of the batch in its turn; after each turn one
        call carries that batch's last backward and the first forward of the batch ``in_flight``
        later (so with one in flight: the next batch's)."""
        batches = iter(batches)
        ahead = deque((b, edge.submit([(self.route.first, b.source)], None, lr))
                      for _, b in zip(range(self.in_flight), batches))
        tail = []
        while ahead:
            batch, reply = ahead.popleft()
            batch, act = self.arrived(batch, reply())
            turns.wait(batch.step)
            grad, loss = self.turn(edge, batch, act, lr)
            finished(batch, loss)
            turns.done(batch.step)
            piggyback = [(self.route.last, grad)]
            later = next(batches, None)
            if later is not None:
                ahead.append((later, edge.submit([*piggyback, (self.route.first, later.source)], None, lr)))
            else:
                tail.append(edge.submit(piggyback, None, lr))
        for wait in tail:
            wait()


class Autograd(Engine):
    name = "autograd"
    route_for = staticmethod(autograd_route)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        # The graph stays attached: it crosses the wire with the tensor.
        out = self.outgoing(hop, x, self.stage.modules[hop.segment](self.incoming(hop, x)))
        return Reply(loss=self.stage.loss(out, labels)) if hop.kind == "loss" else Reply(output=out)

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        for batch in batches:
            with self.autograd.context() as ctx:
                batch, act = self.arrived(batch, edge.run([(self.route.first, batch.source)], None, lr))
                turns.wait(batch.step)
                _, loss = self.turn(edge, batch, act, lr)
                with self.guard():
                    self.autograd.backward(ctx, [loss])  # across every cut, back to the edge's first segment
                    self.step_from_context(ctx, lr)
                finished(batch, loss.item())
                turns.done(batch.step)
                edge.step(ctx, lr)


class Local(Engine):
    name = "local"
    route_for = staticmethod(local_route)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        if hop.kind == "local":  # the edge: forward, its own head's loss, step; the activation leaves detached
            out = self.outgoing(hop, x, self.stage.modules[hop.segment](self.incoming(hop, x)))
            return Reply(output=out.detach(), loss=self.head.learn(self.stage, hop.segment, out, labels, lr))
        # The central's turnaround: no gradient for its input, since none goes back.
        loss = self.stage.loss(self.stage.modules[hop.segment](x), labels)
        self.stage.backprop(hop.segment, loss, None, x, lr)
        return Reply(loss=loss.item())

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        """Up to ``in_flight`` batches sent ahead; each batch's next is sent as soon as its
        activation is in, before its turn: the edge never waits on the central's reply, only for
        a free place among those in flight. Central placement sends the labels down with the inputs."""
        batches = iter(batches)

        def send(batch: Batch) -> tuple[Batch, Callable[[], Reply]]:
            return batch, edge.submit([(self.route.first, batch.source)], batch.y, lr)

        ahead = deque(send(b) for _, b in zip(range(self.in_flight), batches))
        while ahead:
            batch, reply = ahead.popleft()
            batch, act = self.arrived(batch, reply())
            later = next(batches, None)
            if later is not None:
                ahead.append(send(later))
            turns.wait(batch.step)
            _, loss = self.turn(edge, batch, act, lr)
            finished(batch, loss)
            turns.done(batch.step)


ENGINES: dict[str, type[Engine]] = {"relay": Relay, "autograd": Autograd, "local": Local}


def engine_name(cfg: TrainConfig) -> str:
    """The engine a config asks for: ``local`` under train.edge_loss: local, else train.engine."""
    return "local" if cfg.edge_loss == "local" else cfg.engine


def engine_for(name: str, places: list[str], stage: Stage, in_flight: int = 1,
               defences: Optional[Defences] = None, autograd: Any = None,
               guard: Callable[[], AbstractContextManager] = nullcontext, head: Optional[EdgeHead] = None) -> Engine:
    return ENGINES[name](places, stage, in_flight, defences, autograd, guard, head)
