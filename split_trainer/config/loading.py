"""Reading a config: a YAML file (YAML 1.2 floats) plus dotted ``KEY=VALUE`` overrides, every
value's type checked against its field's, then each section's own checks and the whole's."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from split_trainer.config.errors import ConfigError, _require
from split_trainer.config.whole import Config


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML alone reads ``1e-3`` as a string. No aliases: a few lines of them
    nest into billions of values (a "billion laughs" file), which a config never needs."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"uses a YAML alias (*{event.anchor}) at line {event.start_mark.line + 1}: write the "
                              f"value out (aliases are refused)")
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Return value (ints widened to float where a float is wanted) or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        _require(value in choices, f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _check_type(value, args[0], key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _require(_finite(value), f"{key} must be finite (no inf or NaN), got {value!r}")
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    _require(ok, f"{key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _finite(value: Any) -> bool:
    """No inf or NaN anywhere in ``value`` (a number, or lists and mappings of them): one such value
    in a rate, a bound or a statistic turns a run's every number into NaN without an error."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


def _build(cls: type, raw: Any, prefix: str) -> Any:
    _require(isinstance(raw, dict), f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        _require(key in names, f"unknown config key {prefix}{key} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as a YAML scalar)."""
    key, sep, value = text.partition("=")
    _require(bool(sep) and bool(key.strip()), f"override {text!r} must look like KEY=VALUE, e.g. train.lr=0.1")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except (yaml.YAMLError, ConfigError, RecursionError):
        parsed = value
    _require(not isinstance(parsed, dict), f"override {text!r}: the value must be a scalar or a list")
    return key.strip().split("."), parsed


def load_config(path: Optional[str | Path], overrides: list[str] = ()) -> Config:
    """Read the YAML file (or defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        _require(path.is_file(), f"config file {path} not found: pass --config with a YAML file, e.g. configs/mnist.yaml")
        try:
            raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
        except ConfigError as exc:
            raise ConfigError(f"config file {path} {exc}") from None
        except (RecursionError, UnicodeDecodeError) as exc:
            what = "nests too deeply" if isinstance(exc, RecursionError) else "is not UTF-8 text"
            raise ConfigError(f"config file {path} {what}: it is no config") from None
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Validate a plain mapping (a YAML file's, or one saved in a checkpoint) plus overrides."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            node = node.setdefault(part, {})
            _require(isinstance(node, dict), f"override {text!r}: {part} is not a section")
        node[keys[-1]] = value
    return _build(Config, raw, "")
