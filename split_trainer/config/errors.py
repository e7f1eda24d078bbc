"""The one-line check that raises a config's error (core.errors.ConfigError)."""

from __future__ import annotations

from split_trainer.core.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
