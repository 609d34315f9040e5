"""A strict typed loader: mappings (from yaml/json) -> dataclasses, one-line keyed errors.

:func:`build` checks every value against the dataclass's type hints (unknown keys, missing
required keys and wrong types are :class:`ConfigError` naming the dotted key). Numeric ranges
are declared once, on the field, as ``Annotated[int, Range(ge=1)]``; :class:`Checked`'s
``__post_init__`` enforces them, whether the dataclass came from a yaml or from code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigError

__all__ = ["Checked", "Range", "build", "check_ranges", "flatten", "to_dict"]


@dataclass(frozen=True)
class Range:
    """A numeric bound for an ``Annotated`` config field: ``ge``/``gt`` below, ``le``/``lt`` above.

    ``note`` explains a sentinel, e.g. ``Range(ge=-1, note="-1: unlimited")``.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def holds(self, v: float) -> bool:
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def describe(self) -> str:
        lo = (f"[{self.ge}", self.ge) if self.ge is not None else (f"({self.gt}", self.gt)
        hi = (f"{self.le}]", self.le) if self.le is not None else (f"{self.lt})", self.lt)
        if lo[1] is not None and hi[1] is not None:
            if self.ge is not None and self.le is not None:
                text = f"in {self.ge}..{self.le}"
            else:
                text = f"in {lo[0]}, {hi[0]}"
        elif lo[1] is not None:
            text = f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        else:
            text = f"<= {self.le}" if self.le is not None else f"< {self.lt}"
        return f"must be {text}" + (f" ({self.note})" if self.note else "")


def check_ranges(obj: Any) -> None:
    """Raise :class:`ConfigError` for the first field of ``obj`` outside its :class:`Range`."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        for meta in getattr(hints.get(f.name), "__metadata__", ()):
            v = getattr(obj, f.name)
            if isinstance(meta, Range) and isinstance(v, (int, float)) and not meta.holds(v):
                raise ConfigError(f.name, f"{meta.describe()}, got {v}")


class Checked:
    """Mixin for config dataclasses: ``__post_init__`` enforces the fields' ranges.

    Subclasses with further checks call ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        check_ranges(self)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; return it (lists -> tuples where asked)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_coerce(args[0], v, f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly.

    Unknown keys, missing required keys and wrong types raise :class:`ConfigError` with the
    dotted key; ``__post_init__`` checks of impossible values are re-keyed under ``prefix``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in fields:
            raise ConfigError(
                join(str(k)), f"unknown key (expected one of: {', '.join(sorted(fields))})"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], join(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                join(name), f"missing required key (expected {_type_name(hints[name])})"
            )
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.within(prefix) from None


def to_dict(obj: Any) -> dict:
    """``asdict`` that turns tuples into lists, so the result round-trips through yaml/json."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the form logged as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
