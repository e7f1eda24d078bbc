"""A stage: one side's segments of a plan (the central's, or one edge replica's) on one device,
one optimizer per segment, and the state a checkpoint keeps of them.

How a training hop runs (graph kept for distributed autograd, or detached and relayed) is the
engine's business (split_trainer.training.engines); a stage runs segments and steps their optimizers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from split_trainer.config import TrainConfig
from split_trainer.core.tensors import on_cpu
from split_trainer.model.losses import loss_fn
from split_trainer.training.optim import make_optimizer, step_with

Tensor = torch.Tensor


class Stage:
    def __init__(self, modules: dict[int, nn.Module], cfg: TrainConfig, device: torch.device = torch.device("cpu")):
        self.device = device
        self.loss = loss_fn(cfg.loss)
        self.modules = {i: m.to(device) for i, m in modules.items()}
        # A segment without parameters (a pool, a flatten) has nothing to step.
        self.optimizers = {i: make_optimizer(cfg, m.parameters()) for i, m in modules.items()
                           if any(True for _ in m.parameters())}

    def here(self, tensor: Optional[Tensor]) -> Optional[Tensor]:
        """A tensor from the wire (on the CPU) on this stage's device."""
        return tensor.to(self.device) if tensor is not None else None

    def score(self, segment: int, x: Tensor, labels: Tensor) -> tuple[float, int, int]:
        """(summed loss, correct predictions, samples) of the last segment on one batch, no grad."""
        with torch.no_grad():
            out = self.modules[segment](x)
            return (self.loss(out, labels, reduction="sum").item(), int((out.argmax(1) == labels).sum()),
                    len(labels))

    def infer(self, segment: int, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.modules[segment](x)

    def backprop(self, segment: int, out: Tensor, grad: Optional[Tensor], x: Tensor, lr: float,
                 stash: Optional[list[Tensor]] = None) -> Optional[Tensor]:
        """Backprop ``out`` (with ``grad``) into the segment and its input, step, return d/d input.
        ``stash``: the copies of the parameters that ``out`` was computed with, when not the
        parameters themselves; their gradients step the parameters."""
        params = list(self.modules[segment].parameters())
        wanted = ([x] if x.requires_grad else []) + (stash or params)
        if not wanted:
            return None
        grads = torch.autograd.grad(out, wanted, grad)
        if params:
            step_with(self.optimizers[segment], dict(zip(params, grads[-len(params):])), lr)
        return grads[0] if x.requires_grad else None

    def train(self, mode: bool = True) -> None:
        for module in self.modules.values():
            module.train(mode)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Every segment's parameters and buffers, under the full model's names, on the CPU (they
        cross the wire and go into checkpoints that load on machines without a GPU)."""
        return {k: v.detach().to("cpu", copy=True) for m in self.modules.values() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for module in self.modules.values():
            module.load_state_dict({k: state[k] for k in module.state_dict()})

    def rng_state(self) -> dict[str, Tensor]:
        """The RNG streams this stage's dropout draws from (the CPU's, and its GPU's when on one)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def part(self) -> dict[str, Any]:
        """This stage's share of a checkpoint: segments, optimizer states (on the CPU; loading moves
        them to each parameter's device) and RNG."""
        return {"module": self.state_dict(),
                "optimizers": {str(i): on_cpu(opt.state_dict()) for i, opt in self.optimizers.items()},
                "rng": self.rng_state()}

    def load_part(self, part: dict[str, Any]) -> None:
        self.load_state_dict(part["module"])
        for i, opt in self.optimizers.items():
            opt.load_state_dict(part["optimizers"][str(i)])
        self.set_rng_state(part["rng"])
