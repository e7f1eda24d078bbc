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
loss on what arrives, and nothing crosses back. Its edge side is its own class (``LocalEdge``), the
one engine that holds a head.

Each engine takes what it uses and nothing else; ``build`` picks that from the config, and
``for_edge`` builds an edge's side (``central_engine`` and ``edge_engine`` choose the class once,
by ``engine_name``). The per-batch pieces (``first``, ``turn``, ``last``, and the autograd
engine's ``backward``) are what every driver of a span is made of: one edge's batches here
(``drive``), or every edge's at once when each batch needs them all (another placement's driver).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Iterable, Optional, Protocol

import torch

from split_trainer.config import Config, TrainConfig
from split_trainer.core.batch import Batch
from split_trainer.core.hops import Hop, HopKind
from split_trainer.model.plan import Plan
from split_trainer.privacy.defences import Defences
from split_trainer.training.dispatch import Turns
from split_trainer.training.local_loss import EdgeHead
from split_trainer.training.optim import step_with
from split_trainer.training.route import Route, autograd_route, eval_route, local_route, relay_route
from split_trainer.training.stage import Stage
from split_trainer.transport.base import Autograd as AutogradContexts
from split_trainer.transport.wire import Reply

Tensor = torch.Tensor
Guard = Callable[[], AbstractContextManager]
Work = list[tuple[Hop, Any]]


class EdgeCalls(Protocol):
    """The central's link to one edge (split_trainer.transport.link.Link)."""

    def run(self, work: Work, labels: Optional[Tensor], lr: float, evaluating: bool = False) -> Reply: ...

    def submit(self, work: Work, labels: Optional[Tensor], lr: float) -> Callable[[], Reply]: ...

    def step(self, context_id: int, lr: float) -> Callable[[], None]: ...


Finished = Callable[[Batch, float], None]
Batches = Iterable[Batch]  # one edge's batches, each assigned when its driver thread gets to it (dispatch.py)


class Engine:
    """One stage's engine: the central's (which also drives the edges' batches) or an edge replica's.
    ``defences``: the edge's (privacy.defences), applied around its hops; ``guard``: held around the
    central's own compute (transport.base.Transport.guard)."""
    name = ""
    note = ""
    """What the banner adds after the engine's name."""

    def __init__(self, places: list[str], stage: Stage, defences: Optional[Defences] = None,
                 guard: Guard = nullcontext):
        self.stage, self.defences, self.guard = stage, defences, guard
        self.route: Route = self.route_for(places)
        self.eval_hops = eval_route(places)

    @classmethod
    def build(cls, train: TrainConfig, places: list[str], stage: Stage, autograd: AutogradContexts,
              defences: Optional[Defences] = None, guard: Guard = nullcontext) -> "Engine":
        """This engine from the config: each class takes what it uses of it."""
        return cls(places, stage, defences, guard)

    @classmethod
    def for_edge(cls, cfg: Config, plan: Plan, stage: Stage, defences: Defences,
                 autograd: AutogradContexts) -> "Engine":
        """An edge replica's side of this engine."""
        return cls.build(cfg.train, plan.places, stage, autograd, defences)

    @staticmethod
    def route_for(places: list[str]) -> Route:
        raise NotImplementedError

    def run(self, hop: Hop, x: Optional[Tensor], labels: Optional[Tensor], lr: float) -> Reply:
        """Run one hop on this stage. Inputs come from the wire on the CPU and move to the stage's
        device; outputs stay there (the wire moves them)."""
        x, labels = self.stage.here(x), self.stage.here(labels)
        if hop.kind is HopKind.INFER:
            return Reply(output=self.outgoing(hop, x, self.stage.infer(hop.segment, x)))
        if hop.kind is HopKind.SCORE:
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

    def own_state(self) -> dict[str, Any]:
        """What an edge's checkpoint part keeps of this engine beyond its stage (LocalEdge: its head)."""
        return {}

    def load_own(self, state: dict[str, Any]) -> None:
        pass

    # -- a batch's pieces ------------------------------------------------------------------------
    def first(self, batch: Batch) -> Work:
        """The edge's first hop of ``batch``: its first segment's forward on the batch's inputs."""
        return [(self.route.first, batch.source)]

    def last(self, grad: Optional[Tensor]) -> Work:
        """The edge's last hop of a batch, after the turn (relay: its first segment's backward)."""
        return [(self.route.last, grad)] if self.route.last is not None else []

    @staticmethod
    def arrived(batch: Batch, reply: Reply) -> tuple[Batch, Tensor]:
        """The reply to a batch's first forward: the batch as the central now knows it (its sample
        count; in edge placement its labels, when the loss is on the central; under a local loss the
        edge's), and its cut activation."""
        y = reply.labels if reply.labels is not None else batch.y
        return dataclasses.replace(batch, y=y, samples=len(reply.output), edge_loss=reply.loss), reply.output

    def turn(self, edge: Optional[EdgeCalls], batch: Batch, tensor: Tensor, lr: float) -> tuple[Optional[Tensor], Any]:
        """The central's turn: its hops here, the edge's hops between them as one call each (``edge``
        None: a turn with none, when the driver merges several edges' activations). Returns the
        tensor the last hop handed on, and the batch's loss."""
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
                 guard: Guard = nullcontext):
        super().__init__(places, stage, defences, guard)
        self.in_flight = in_flight
        # segment -> the forwards awaiting their gradient, oldest first: (input, output, stashed weights)
        self.pending: dict[int, deque[tuple[Tensor, Tensor, Optional[list[Tensor]]]]] = defaultdict(deque)

    @classmethod
    def build(cls, train: TrainConfig, places: list[str], stage: Stage, autograd: AutogradContexts,
              defences: Optional[Defences] = None, guard: Guard = nullcontext) -> "Relay":
        return cls(places, stage, train.in_flight, defences, guard)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        if hop.kind is HopKind.BACKWARD:  # x is the gradient of the segment's output
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
        if hop.kind is HopKind.FORWARD:
            self.pending[hop.segment].append((x, out, stash))
            return Reply(output=out.detach())
        loss = self.stage.loss(out, labels)  # turnaround
        return Reply(output=self.stage.backprop(hop.segment, loss, None, x, lr), loss=loss.item())

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        """Up to ``in_flight`` first forwards ahead of the batch in its turn; after each turn one
        call carries that batch's last backward and the first forward of the batch ``in_flight``
        later (so with one in flight: the next batch's)."""
        batches = iter(batches)
        ahead = deque((b, edge.submit(self.first(b), None, lr)) for _, b in zip(range(self.in_flight), batches))
        tail = []
        while ahead:
            batch, reply = ahead.popleft()
            batch, act = self.arrived(batch, reply())
            turns.wait(batch.step)
            grad, loss = self.turn(edge, batch, act, lr)
            finished(batch, loss)
            turns.done(batch.step)
            later = next(batches, None)
            if later is not None:
                ahead.append((later, edge.submit([*self.last(grad), *self.first(later)], None, lr)))
            else:
                tail.append(edge.submit(self.last(grad), None, lr))
        for wait in tail:
            wait()


class Autograd(Engine):
    name = "autograd"
    route_for = staticmethod(autograd_route)

    def __init__(self, places: list[str], stage: Stage, autograd: AutogradContexts,
                 defences: Optional[Defences] = None, guard: Guard = nullcontext):
        super().__init__(places, stage, defences, guard)
        self.autograd = autograd  # the transport's contexts (transport.base.Autograd)

    @classmethod
    def build(cls, train: TrainConfig, places: list[str], stage: Stage, autograd: AutogradContexts,
              defences: Optional[Defences] = None, guard: Guard = nullcontext) -> "Autograd":
        return cls(places, stage, autograd, defences, guard)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        # The graph stays attached: it crosses the wire with the tensor.
        out = self.outgoing(hop, x, self.stage.modules[hop.segment](self.incoming(hop, x)))
        return Reply(loss=self.stage.loss(out, labels)) if hop.kind is HopKind.LOSS else Reply(output=out)

    def step_from_context(self, context_id: int, lr: float) -> None:
        """Step every segment of this stage with an autograd context's gradients."""
        grads = self.autograd.gradients(context_id)
        for optimizer in self.stage.optimizers.values():
            step_with(optimizer, grads, lr)

    def backward(self, context_id: int, loss: Tensor, lr: float) -> None:
        """The batch's backward across every cut, back to the edges' first segments; the central steps."""
        with self.guard():
            self.autograd.backward(context_id, [loss])
            self.step_from_context(context_id, lr)

    def drive(self, edge: EdgeCalls, batches: Batches, turns: Turns, lr: float, finished: Finished) -> None:
        for batch in batches:
            with self.autograd.context() as ctx:
                batch, act = self.arrived(batch, edge.run(self.first(batch), None, lr))
                turns.wait(batch.step)
                _, loss = self.turn(edge, batch, act, lr)
                self.backward(ctx, loss, lr)
                finished(batch, loss.item())
                turns.done(batch.step)
                edge.step(ctx, lr)()


class Local(Engine):
    """The central's side of a local loss: its turnaround learns from what arrives, nothing goes back."""
    name = "local"
    note = " (each edge learns from its own head; nothing comes back down)"
    route_for = staticmethod(local_route)

    def __init__(self, places: list[str], stage: Stage, in_flight: int = 1, defences: Optional[Defences] = None,
                 guard: Guard = nullcontext):
        super().__init__(places, stage, defences, guard)
        self.in_flight = in_flight

    @classmethod
    def build(cls, train: TrainConfig, places: list[str], stage: Stage, autograd: AutogradContexts,
              defences: Optional[Defences] = None, guard: Guard = nullcontext) -> "Local":
        return cls(places, stage, train.in_flight, defences, guard)

    @classmethod
    def for_edge(cls, cfg: Config, plan: Plan, stage: Stage, defences: Defences,
                 autograd: AutogradContexts) -> "LocalEdge":
        head = EdgeHead(cfg.train, stage.modules[0], plan.image, plan.shape["num_classes"], stage.device)
        return LocalEdge(plan.places, stage, head, defences)

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
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
            return batch, edge.submit(self.first(batch), batch.y, lr)

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


class LocalEdge(Local):
    """An edge's side of a local loss: its first segment's forward, its own head's loss and step
    (training.local_loss); the activation leaves detached. The head is kept in the edge's part."""

    def __init__(self, places: list[str], stage: Stage, head: EdgeHead, defences: Optional[Defences] = None):
        super().__init__(places, stage, 1, defences)
        self.head = head

    def train_hop(self, hop: Hop, x: Tensor, labels: Optional[Tensor], lr: float) -> Reply:
        out = self.outgoing(hop, x, self.stage.modules[hop.segment](self.incoming(hop, x)))
        return Reply(output=out.detach(), loss=self.head.learn(self.stage, hop.segment, out, labels, lr))

    def own_state(self) -> dict[str, Any]:
        return {"head": self.head.state()}

    def load_own(self, state: dict[str, Any]) -> None:
        if "head" in state:  # absent: a run that turned the local loss on as it resumed
            self.head.load(state["head"])


ENGINES: dict[str, type[Engine]] = {"relay": Relay, "autograd": Autograd, "local": Local}


def engine_name(cfg: TrainConfig) -> str:
    """The engine a config asks for: ``local`` under train.edge_loss: local, else train.engine."""
    return "local" if cfg.edge_loss == "local" else cfg.engine


def central_engine(cfg: Config, places: list[str], stage: Stage, autograd: AutogradContexts, guard: Guard) -> Engine:
    return ENGINES[engine_name(cfg.train)].build(cfg.train, places, stage, autograd, guard=guard)


def edge_engine(cfg: Config, plan: Plan, stage: Stage, defences: Defences, autograd: AutogradContexts) -> Engine:
    return ENGINES[engine_name(cfg.train)].for_edge(cfg, plan, stage, defences, autograd)
