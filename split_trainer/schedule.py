"""The path of one batch through a plan: which side runs which segment, what crosses each cut,
and in which order the gradients come back. The same code runs every plan.

A batch's work is a sequence of hops, each one segment on one side. Places alternate, so every
hop hands its output across the wire to the next. With the ``relay`` engine, for segments
0..m-1:

    forward 0 (edge) | forward 1 .. forward m-2 | turnaround m-1 | backward m-2 .. backward 1 | backward 0 (edge)
                     '------------------------- the central's turn ---------------------------'

``turnaround`` is the last segment's forward, the loss and its backward. Every segment steps its
own optimizer as soon as it has its gradients. The central's segments are in use from its first
hop to its last: that stretch is the central's *turn*, which batches take strictly in dispatch
order, so every batch sees the central's weights after the previous batch's step. The edge's
first forward runs before the turn (while other edges' batches hold it), and its last backward
after (sent with the edge's next batch). With the ``autograd`` engine the turn runs the forwards
and the ``loss`` inside one distributed-autograd context, ``dist_autograd.backward`` carries the
gradients back across every cut, and each side steps from the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
import torch.distributed.autograd as dist_autograd
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .optim import make_optimizer, step_with

Tensor = torch.Tensor


def to_wire(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """What crosses a cut travels on the CPU as ``dtype`` (rpc.activation_dtype): torch RPC's
    RRefs and distributed autograd take no CUDA tensors. Differentiable, so the autograd engine's
    gradients cross the same way."""
    return tensor.to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)


def from_wire(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float32 else tensor


def _on_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.to("cpu")
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


class Hop(NamedTuple):
    kind: str  # relay: forward, turnaround, backward; autograd: forward, loss; evaluation: infer, score
    segment: int
    place: str

    @property
    def needs_labels(self) -> bool:
        return self.kind in ("turnaround", "loss", "score")

    def arrives(self) -> tuple[str, Optional[int]]:
        """(kind, cut) of the tensor this hop takes in."""
        if self.kind == "backward":
            return "activation_grads", self.segment
        return ("inputs", None) if self.segment == 0 else ("activations", self.segment - 1)

    def leaves(self) -> Optional[tuple[str, int]]:
        """(kind, cut) of the tensor this hop hands on across the wire, or None."""
        if self.kind in ("forward", "infer"):
            return "activations", self.segment
        if self.kind in ("turnaround", "backward") and self.segment > 0:
            return "activation_grads", self.segment - 1
        return None


@dataclass(frozen=True)
class Route:
    first: Hop  # the edge's forward of segment 0, before the turn
    turn: tuple[Hop, ...]  # the central's first hop to its last
    last: Optional[Hop]  # relay: the edge's backward of segment 0, after the turn


def train_route(places: list[str], engine: str) -> Route:
    m = len(places)
    forwards = [Hop("forward", i, places[i]) for i in range(1, m - 1)]
    if engine == "autograd":
        return Route(Hop("forward", 0, places[0]), (*forwards, Hop("loss", m - 1, places[-1])), None)
    backwards = [Hop("backward", i, places[i]) for i in range(m - 2, 0, -1)]
    return Route(Hop("forward", 0, places[0]), (*forwards, Hop("turnaround", m - 1, places[-1]), *backwards),
                 Hop("backward", 0, places[0]))


def eval_route(places: list[str]) -> tuple[Hop, ...]:
    return (*(Hop("infer", i, p) for i, p in enumerate(places[:-1])), Hop("score", len(places) - 1, places[-1]))


class Side:
    """One side's segments of a plan (the central's, or one edge replica's), one optimizer each,
    and the graphs of the forwards that still wait for their gradient (relay)."""

    def __init__(self, modules: dict[int, nn.Module], cfg: TrainConfig, device: torch.device = torch.device("cpu")):
        self.device = device
        self.modules = {i: m.to(device) for i, m in modules.items()}
        self.engine = cfg.engine
        # A segment without parameters (a pool, a flatten) has nothing to step.
        self.optimizers = {i: make_optimizer(cfg, m.parameters()) for i, m in modules.items()
                           if any(True for _ in m.parameters())}
        self.pending: dict[int, tuple[Tensor, Tensor]] = {}

    def run(self, hop: Hop, x: Optional[Tensor], labels: Optional[Tensor], lr: float) -> tuple[Optional[Tensor], Any]:
        """Run one hop; return (the tensor it hands on or None, a loss or score or None). Inputs come
        from the wire on the CPU and move to this side's device; outputs stay there (to_wire moves them)."""
        module = self.modules[hop.segment]
        x = x.to(self.device) if x is not None else None
        labels = labels.to(self.device) if labels is not None else None
        if hop.kind == "backward":
            return self._backward(hop.segment, x, lr), None
        if hop.kind in ("infer", "score"):
            with torch.no_grad():
                out = module(x)
                if hop.kind == "infer":
                    return out, None
                return None, (F.cross_entropy(out, labels, reduction="sum").item(), int((out.argmax(1) == labels).sum()),
                              len(labels))
        if self.engine == "autograd":  # the graph stays attached: it crosses the wire with the tensor
            out = module(x)
            return (F.cross_entropy(out, labels), None) if hop.kind == "loss" else (out, None)
        x = x.detach().requires_grad_(hop.segment > 0)
        out = module(x)
        if hop.kind == "forward":
            self.pending[hop.segment] = (x, out)
            return out.detach(), None
        loss = F.cross_entropy(out, labels)  # turnaround
        return self._step(hop.segment, loss, None, x, lr), loss.item()

    def _backward(self, segment: int, grad: Tensor, lr: float) -> Optional[Tensor]:
        x, out = self.pending.pop(segment)
        return self._step(segment, out, grad, x, lr)

    def _step(self, segment: int, out: Tensor, grad: Optional[Tensor], x: Tensor, lr: float) -> Optional[Tensor]:
        """Backprop ``out`` (with ``grad``) into the segment and its input, step, return d/d input."""
        params = list(self.modules[segment].parameters())
        wanted = ([x] if x.requires_grad else []) + params
        if not wanted:
            return None
        grads = torch.autograd.grad(out, wanted, grad)
        if params:
            step_with(self.optimizers[segment], dict(zip(params, grads[-len(params):])), lr)
        return grads[0] if x.requires_grad else None

    def step_from_context(self, context_id: int, lr: float) -> None:
        """Autograd engine: step every segment with this context's gradients."""
        grads = dist_autograd.get_gradients(context_id)
        for optimizer in self.optimizers.values():
            step_with(optimizer, grads, lr)

    def rng_state(self) -> dict[str, Tensor]:
        """The RNG streams this side's dropout draws from (the CPU's, and its GPU's when on one)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    def state_dict(self) -> dict[str, Tensor]:
        """Every segment's parameters and buffers, under the full model's names, on the CPU (they
        cross the wire and go into checkpoints that load on machines without a GPU)."""
        return {k: v.detach().to("cpu", copy=True) for m in self.modules.values() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for module in self.modules.values():
            module.load_state_dict({k: state[k] for k in module.state_dict()})

    def optimizer_states(self) -> dict[str, Any]:
        """On the CPU; load_state_dict moves them back to each parameter's device."""
        return {str(i): _on_cpu(opt.state_dict()) for i, opt in self.optimizers.items()}

    def load_optimizer_states(self, states: dict[str, Any]) -> None:
        for i, opt in self.optimizers.items():
            opt.load_state_dict(states[str(i)])


class EdgeCalls(Protocol):
    """The central's line to one edge (split_trainer.fleet.EdgeHandle)."""

    def run(self, work: list[tuple[Hop, Optional[Tensor]]], labels: Optional[Tensor], lr: float,
            evaluating: bool = False) -> tuple[Optional[Tensor], Any]: ...

    def step(self, context_id: int, lr: float) -> None: ...


class Turn(Protocol):
    def wait(self, step: int) -> None: ...

    def done(self, step: int) -> None: ...


@dataclass
class Batch:
    step: int
    edge: int  # the lane (edge index) it goes to
    x: Optional[Tensor] = None  # central placement: the inputs and labels
    y: Optional[Tensor] = None  # edge placement: the labels, when the edge sends them
    draw: Any = None  # edge placement: which of its own batches the edge runs (shards.Draw)
    samples: int = 0  # known once the first activation arrives

    @property
    def source(self) -> Any:
        return self.x if self.x is not None else self.draw


class Schedule:
    """Runs batches along their route: the central's hops on ``central``, the edge's over RPC."""

    def __init__(self, places: list[str], engine: str, central: Side):
        self.route = train_route(places, engine)
        self.eval_hops = eval_route(places)
        self.engine, self.central = engine, central

    def train_lane(self, edge: EdgeCalls, batches: list[Batch], turn: Turn, lr: float,
                   finished: Callable[[Batch, float], None]) -> None:
        """One edge's share of a chunk, in order; ``finished(batch, loss)`` after each batch's turn."""
        if self.engine == "autograd":
            return self._autograd_lane(edge, batches, turn, lr, finished)
        first, last = self.route.first, self.route.last
        carry: list[tuple[Hop, Optional[Tensor]]] = []
        for batch in batches:
            # One call carries the previous batch's last backward and this batch's first forward.
            act, labels = edge.run([*carry, (first, batch.source)], None, lr)
            batch.y, batch.samples = labels if labels is not None else batch.y, len(act)
            turn.wait(batch.step)
            grad, loss = self._through(edge, batch, act, lr)
            finished(batch, loss)
            turn.done(batch.step)
            carry = [(last, grad)]
        edge.run(carry, None, lr)

    def _autograd_lane(self, edge: EdgeCalls, batches: list[Batch], turn: Turn, lr: float,
                       finished: Callable[[Batch, float], None]) -> None:
        for batch in batches:
            with dist_autograd.context() as ctx:
                act, labels = edge.run([(self.route.first, batch.source)], None, lr)
                batch.y, batch.samples = labels if labels is not None else batch.y, len(act)
                turn.wait(batch.step)
                loss, _ = self._through(edge, batch, act, lr)
                dist_autograd.backward(ctx, [loss])  # across every cut, back to the edge's first segment
                self.central.step_from_context(ctx, lr)
                finished(batch, loss.item())
                turn.done(batch.step)
                edge.step(ctx, lr)

    def _through(self, edge: EdgeCalls, batch: Batch, tensor: Tensor, lr: float) -> tuple[Tensor, Any]:
        """The central's turn: its hops here, the edge's hops between them as one call each."""
        loss = None
        for hop in self.route.turn:
            if hop.place == "central":
                tensor, stat = self.central.run(hop, tensor, batch.y, lr)
            else:
                tensor, stat = edge.run([(hop, tensor)], batch.y if hop.needs_labels else None, lr)
            loss = stat if stat is not None else loss
        return tensor, loss

    def evaluate(self, edge: EdgeCalls, source: Any, y: Optional[Tensor]) -> tuple[float, int, int]:
        """(summed loss, correct predictions, samples) of one test batch through the whole plan, no
        grad. ``source``: the inputs, or a draw of the edge's own test batch (then ``y`` is None
        and the edge sends the labels only if the loss is on the central)."""
        tensor, stat = source, None
        for hop in self.eval_hops:
            if hop.place == "central":
                tensor, stat = self.central.run(hop, tensor, y, 0.0)
            else:
                tensor, stat = edge.run([(hop, tensor)], y if hop.needs_labels else None, 0.0, evaluating=True)
                if hop.segment == 0 and stat is not None:
                    y = stat  # the edge's own labels, for the central's loss
        return stat
