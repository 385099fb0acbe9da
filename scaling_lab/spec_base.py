"""The ground every spec section stands on: SpecError, the one-line field check, paths relative to the spec, and
frozen dataclasses built from plain data (and back) with errors that name the field. Imports nothing of scaling_lab,
so that the settings classes elsewhere (early stopping, search, tracking) can use it without importing the spec."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal


class SpecError(ValueError):
    """A study spec that cannot be run; the message names the field and what was expected."""


def require(ok: bool, path: str, expected: str, got: Any) -> None:
    """Raise SpecError "<path>: expected <expected>, got <got>" unless `ok` (without ", got" where `got` is None)."""
    if not ok:
        raise SpecError(f"{path}: expected {expected}" + (f", got {got!r}" if got is not None else ""))


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    where = path or "spec"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{_join(path, key)}: unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{_join(path, name)}: required key is missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain data (lists, dicts, scalars) that `build` turns back into the same object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except SpecError:
                continue
        raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise SpecError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type, path): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is Any:
        return _plain(value, path)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _plain(value: Any, path: str) -> Any:
    """`value` if it is plain JSON data (mappings with string keys, lists, scalars)."""
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise SpecError(f"{path}: expected string keys, got {key!r}")
        return {k: _plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpecError(f"{path}: expected plain data (a mapping, list, number, string, true/false or null), got {value!r}")
