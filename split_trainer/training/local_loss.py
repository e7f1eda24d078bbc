"""Local-loss training (``train.edge_loss: local``): each edge's first segment learns from a small
auxiliary head of its own, on its own batch's labels, and no gradient comes back across the cut
(after Han et al., "Accelerating federated learning with split learning on locally generated
losses", 2021).

The head is one linear layer from the whole activation to the classes: 92,170 parameters at the
default cut (64x12x12), five times the segment's 18,816, but about 1 % of its compute (92 k
multiply-adds a sample against 10.8 M), and 11,530 behind model.bottleneck 8. Why not pool first,
as a smaller head would: a head that sees only per-channel means (or 2x2, 4x4 means) can lower its
loss only by making the activations larger, and the central, which trains on those activations as
they move, then diverged in one-process probes (600 steps: 21 % test accuracy with global pooling,
84 % with 4x4 pooling, 98 % with the linear head, which kept the activations as small as they start).

The head is the edge's alone: it is stepped with the segment, by the same optimizer kind and lr
schedule, kept in the edge's checkpoint part (``head``), and never crosses the wire, not even at
a replica sync (syncs average the segments; each edge's head follows its own replica). It is built
from ``train.seed`` in a forked RNG, so the edge's dropout and noise streams draw what they would
draw without it.

Each local step's gradient (segment and head together) is clipped to ``train.local_clip`` (1.0):
a linear head over a whole activation takes large steps, and behind ``model.bottleneck`` (two
linear maps in a row, whose steps compound) the edge's loss jumped to 23 within 12 steps at lr
0.05 and the central, training on those activations, never recovered (10 % accuracy at 400 steps
in a one-process probe; 94.8 % with the clip, 93.6 % with the loss weighted 0.3 instead).

The head sees the activation as it leaves the edge (after privacy.clip and noise), and NoPeek's
and the adversary's gradients join the head loss's as they join the central's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from split_trainer.config import TrainConfig
from split_trainer.core.tensors import on_cpu
from split_trainer.model.plan import output_shape
from split_trainer.training.optim import make_optimizer, step_with
from split_trainer.training.stage import Stage

Tensor = torch.Tensor


def head_for(per_sample: tuple[int, ...], classes: int) -> nn.Module:
    """One linear layer from the activation (any shape per sample, flattened) to the classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(per_sample).prod()), classes))


class EdgeHead:
    """One edge's auxiliary head for its first segment ``segment``, which takes inputs of ``image``
    shape (channels, height, width), and the head's optimizer."""

    def __init__(self, cfg: TrainConfig, segment: nn.Module, image: tuple[int, ...], classes: int,
                 device: torch.device):
        per_sample = output_shape(segment, image, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.module = head_for(per_sample, classes).to(device)
        self.optimizer = make_optimizer(cfg, self.module.parameters())
        self.clip = cfg.local_clip

    def learn(self, stage: Stage, segment: int, out: Tensor, labels: Tensor, lr: float) -> float:
        """Backprop the head's loss on ``out`` (the segment's output, graph attached) into the
        head and the segment, step both; return the loss."""
        loss = stage.loss(self.module(out), labels)
        own, params = list(self.module.parameters()), list(stage.modules[segment].parameters())
        grads = torch.autograd.grad(loss, own + params)
        if self.clip is not None:  # as torch.nn.utils.clip_grad_norm_ does, on gradients that are not .grad
            norm = torch.nn.utils.get_total_norm(grads)
            grads = [g * (self.clip / (norm + 1e-6)).clamp(max=1.0) for g in grads]
        step_with(self.optimizer, dict(zip(own, grads)), lr)
        if params:
            step_with(stage.optimizers[segment], dict(zip(params, grads[len(own):])), lr)
        return loss.item()

    def state(self) -> dict[str, Any]:
        """For the edge's checkpoint part: the head and its optimizer, on the CPU."""
        return {"module": on_cpu(self.module.state_dict()), "optimizer": on_cpu(self.optimizer.state_dict())}

    def load(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
