"""The one kind of error a config raises, and the one-line check that raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A usage or configuration mistake: reported as one line, exit code 2."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
