"""How a config section is read: a typed dataclass built from a mapping, unknown keys and wrong
types refused with one line, then the section's own ``check(where)``.  Every section of a job
(``noah_ray.config``), of an ``hpo:`` block (``noah_ray.config.hpo``) and of a sweep uses this."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

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
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    return isinstance(value, tp)


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
            raise ConfigError(f"{where}.{k}: {v!r} is not a valid {getattr(hints[k], '__name__', hints[k])}")
        if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check:
        check(where)
    return obj


def positive(where: str, **values: float | None) -> None:
    """One line naming the first of ``values`` that is set and not > 0."""
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{where}.{k}: {v} must be > 0")
