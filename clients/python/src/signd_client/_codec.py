"""How a wire message is declared and checked: the ``Message`` base and ``@message``.

A message is a frozen dataclass; ``@message`` compiles a checker per field
from its annotation (str, bin, bool, int, float, arrays as ``tuple[X, ...]``,
nested messages, ``Annotated[int, Between(lo, hi)]``), so ``from_wire`` names
the field in every error.  The messages themselves are in ``messages``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

from .errors import InvalidArgument

__all__ = ["Between", "M", "Message", "message", "tname"]


@dataclass(frozen=True, slots=True)
class Between:
    """An int field's bounds, checked when a message is decoded (``from_wire``)."""

    lo: int
    hi: int


class Message:
    """Base of the wire messages: frozen dataclasses checked field by field.

    ``from_wire`` checks each field's type against the annotation and names
    the field in the error.  Requests are strict (an unknown field is an
    error, so a client never has an option silently ignored); responses are
    lenient (a newer daemon may add fields).
    """

    _fields: ClassVar[tuple[tuple[str, Callable[[Any, str, bool], Any], bool], ...]]

    #: (name, nested) per field; nested fields hold messages or arrays of them
    _wire_names: ClassVar[tuple[tuple[str, bool], ...]]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, nested in self._wire_names:
            value = getattr(self, name)
            if value is not None:
                out[name] = _to_wire(value) if nested else value
        return out

    @classmethod
    def from_wire(cls, data: Any, *, strict: bool = True, path: str = "") -> typing.Self:
        if not isinstance(data, dict):
            raise InvalidArgument(f"{path or 'args'}: expected a map, got {tname(data)}")
        fields = cls.__dict__.get("_fields")
        if fields is None:
            fields = _compile(cls)
        values: dict[str, Any] = {}
        for name, check, required in fields:
            where = f"{path}.{name}" if path else name
            if name in data and data[name] is not None:
                values[name] = check(data[name], where, strict)
            elif required:
                raise InvalidArgument(f"field '{where}' is required")
        if strict and len(values) < len(data):
            known = {name for name, _, _ in fields}
            for name in data:
                if name not in known:
                    raise InvalidArgument(f"unknown field '{path + '.' if path else ''}{name}'")
        return cls(**values)


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def tname(value: Any) -> str:
    return {
        bytes: "bin",
        str: "str",
        bool: "bool",
        int: "int",
        float: "float",
        dict: "map",
        list: "array",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


_SCALARS: dict[type, str] = {str: "str", bytes: "bin", bool: "bool", int: "int", float: "float"}


def _scalar_checker(tp: type) -> Callable[[Any, str, bool], Any]:
    wire = _SCALARS[tp]

    def check(value: Any, where: str, strict: bool) -> Any:
        if tp is float and type(value) is int:
            return float(value)
        if type(value) is not tp:
            raise InvalidArgument(f"field '{where}': expected {wire}, got {tname(value)}")
        return value

    return check


def _checker(tp: Any) -> Callable[[Any, str, bool], Any]:
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        inner = _checker(base)
        (bounds,) = [e for e in extras if isinstance(e, Between)]

        def check_range(value: Any, where: str, strict: bool) -> Any:
            value = inner(value, where, strict)
            if not bounds.lo <= value <= bounds.hi:
                raise InvalidArgument(
                    f"field '{where}': must be {bounds.lo} to {bounds.hi}, got {value}"
                )
            return value

        return check_range
    if tp in _SCALARS:
        return _scalar_checker(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        item = _checker(item_tp)

        def check_seq(value: Any, where: str, strict: bool) -> Any:
            if not isinstance(value, list):
                raise InvalidArgument(f"field '{where}': expected array, got {tname(value)}")
            return tuple(item(v, f"{where}[{i}]", strict) for i, v in enumerate(value))

        return check_seq
    if isinstance(tp, type) and issubclass(tp, Message):
        msg_cls = tp

        def check_msg(value: Any, where: str, strict: bool) -> Any:
            return msg_cls.from_wire(value, strict=strict, path=where)

        return check_msg
    raise TypeError(f"unsupported wire field type {tp!r}")


def _compile(cls: type[Message]) -> tuple[tuple[str, Callable[[Any, str, bool], Any], bool], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    compiled = []
    names: list[tuple[str, bool]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        required = True
        if typing.get_origin(tp) in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            (tp,) = args
            required = False
        compiled.append((f.name, _checker(tp), required))
        nested = typing.get_origin(tp) is tuple or (
            isinstance(tp, type) and issubclass(tp, Message)
        )
        names.append((f.name, nested))
    result = tuple(compiled)
    cls._fields = result
    cls._wire_names = tuple(names)
    return result


M = TypeVar("M", bound=Message)


@typing.dataclass_transform(frozen_default=True)
def message(cls: type[M]) -> type[M]:
    """Make ``cls`` a frozen wire dataclass and compile its field checks."""
    dc = dataclass(frozen=True, slots=True)(cls)
    _compile(dc)
    return dc
