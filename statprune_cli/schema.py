"""Typed building of plain data (YAML) into dataclasses, with errors that name the key: shared by the run
configuration (config.py) and the methods' options (methods/), which must not import each other."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from statprune_cli.errors import ConfigError, shown


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"2:4"`` -> (2, 4); anything else is a ConfigError."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ConfigError("pruning.pattern", f"expected 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m_ = int(m.group(1)), int(m.group(2))
    if not 0 < n < m_:
        raise ConfigError("pruning.pattern", f"expected N:M with 0 < N < M, got {pattern!r}")
    return n, m_


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "shorthand", None)  # a bare string stands for this one key (DataConfig: dataset)
        if shorthand and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {shown(value)}")
        return build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {shown(value)}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {shown(value)}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {shown(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {shown(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {shown(value)}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {shown(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in the schema, not user input


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """``cls`` from ``data``, every value checked against its annotation; ``prefix`` names the keys in errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(key, f"unknown key; expected one of: {', '.join(sorted(names))}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)
