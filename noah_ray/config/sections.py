"""How a config section is read: a typed dataclass built from a mapping, unknown keys and wrong
types refused with one line, then the section's own ``check(where)``.  Every section of a job
(``noah_ray.config``), of an ``hpo:`` block (``noah_ray.config.hpo``) and of a sweep uses this."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from noah_ray.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (ints are floats, bools are not numbers)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and _items_ok(value, typing.get_args(tp), origin is tuple)
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, tp)


def _items_ok(value: list[Any] | tuple[Any, ...], args: tuple[Any, ...], fixed: bool) -> bool:
    """The elements of a list / tuple against ``list[X]``, ``tuple[X, ...]`` or ``tuple[X, Y]``."""
    if not args:
        return True
    if not fixed or (len(args) == 2 and args[1] is Ellipsis):
        return all(type_ok(v, args[0]) for v in value)
    return len(value) == len(args) and all(type_ok(v, t) for v, t in zip(value, args))


def type_name(tp: Any) -> str:
    """How a one-line error names the annotation ``tp`` (``int``, ``tuple[int, ...]``, ``float | None``)."""
    return str(tp) if typing.get_args(tp) else getattr(tp, "__name__", str(tp))


def nonfinite(value: Any, key: str) -> tuple[str, float] | None:
    """The first float inside ``value`` (nested mappings and lists too) that is inf or nan, with its key."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if isinstance(value, Mapping):
        items = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    return next((bad for sub, v in items if (bad := nonfinite(v, sub)) is not None), None)


def check_finite(key: str, value: Any) -> None:
    """One line naming the first value inside ``value`` that is not a finite number (YAML ``.inf``,
    ``.nan``, or a literal such as ``1.0e+400`` that overflows to inf)."""
    bad = nonfinite(value, key)
    if bad is not None:
        raise ConfigError(f"{bad[0]}: {bad[1]} is not a finite number (YAML .inf / .nan, or a literal such as "
                          f"1.0e+400 that overflows); give a finite value")


def unknown_key(cls: type, data: Mapping[str, Any]) -> str | None:
    """The first key of ``data`` that ``cls`` has no field for (None when all are known)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    return unknown[0] if unknown else None


def section_from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    bad = unknown_key(cls, data)
    if bad is not None:
        known = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{where}: unknown key {bad!r}; known keys: {', '.join(known)}")
    kwargs = {}
    for k, v in data.items():
        if not type_ok(v, hints[k]):
            raise ConfigError(f"{where}.{k}: {v!r} is not a valid {type_name(hints[k])}")
        check_finite(f"{where}.{k}", v)
        if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check:
        check(where)
    return obj


def at_most(where: str, limit: float, **values: float | None) -> None:
    """One line naming the first of ``values`` that is set and above ``limit`` (a typo such as an
    extra zero, or a run that would never end)."""
    for k, v in values.items():
        if v is not None and v > limit:
            raise ConfigError(f"{where}.{k}: {v} is above the sane limit {limit:g}; check the value")


def positive(where: str, **values: float | None) -> None:
    """One line naming the first of ``values`` that is set and not > 0."""
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{where}.{k}: {v} must be > 0")


class DuplicateKeyError(Exception):
    """A YAML mapping that names one key twice (YAML itself keeps the last value without a word)."""


def _construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
    """``SafeLoader.construct_mapping``, refusing a key given twice in one mapping."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:                 # an unhashable key: the base class says so
            break
        if first != line:
            raise DuplicateKeyError(f"key {key!r} appears twice (lines {first} and {line})")
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


#: ``yaml.SafeLoader`` that refuses a key given twice in one mapping
_StrictLoader = type("_StrictLoader", (yaml.SafeLoader,), {"construct_mapping": _construct_mapping})


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of the file ``where``, with one :class:`ConfigError` naming a key given twice
    in one mapping and both its lines (YAML would keep the last value without a word)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except DuplicateKeyError as e:
        raise ConfigError(f"{where}: {e}; keep one of them") from None


def load_json(text: str, where: str) -> Any:
    """``json.loads`` of the file ``where``, with one :class:`ConfigError` naming a key given twice in
    one object (``json`` would keep the last value without a word)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ConfigError(f"{where}: key {k!r} appears twice in one object; keep one of them")
            out[k] = v
        return out

    return json.loads(text, object_pairs_hook=pairs)
