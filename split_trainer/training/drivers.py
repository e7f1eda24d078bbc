"""One driver per placement, chosen once by ``data.placement``: what differs between a horizontal
fleet (central- or edge-held data, replicas of one model) and a vertical one (parties holding
features of the same records, a segment each) is one interface (training.driver.Driver: its
data, its plans, the fingerprint it adds, the banner's plan, whether replicas sync, whether a
model.pt is written, what the audit attacks, a span's training and evaluation), with one
implementation per placement, named here and nowhere else."""

from __future__ import annotations

from typing import Optional

from split_trainer.config import Config
from split_trainer.training.driver import Driver
from split_trainer.training.horizontal import EdgeHeld, Horizontal
from split_trainer.training.vertical import Vertical

DRIVERS: dict[str, type[Driver]] = {"central": Horizontal, "edge": EdgeHeld, "vertical": Vertical}


def driver_for(cfg: Config) -> type[Driver]:
    return DRIVERS[cfg.data.placement]


def driver_named(placement: Optional[str]) -> type[Driver]:
    """The driver of a placement named in a file (a checkpoint's config): central's when unknown."""
    return DRIVERS.get(placement or "central", Horizontal)
