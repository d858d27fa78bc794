"""One codec for every control result shape: dataclass fields <-> JSON objects.

Encoding walks the fields in declaration order, so the JSON keys come out in that
order (the wire format scripts see). Decoding checks every field against its type
annotation and raises ``ProtocolError`` naming the field's path, e.g.
``status.cert.days_left is not an integer``; a decoded shape is never half-typed.

Supported field types: ``str``, ``int`` (never a bool), ``float`` (finite; an int is
accepted), ``bool``, ``list[str]``, ``dict[str, int]``, a nested shape, a list of
shapes, and ``X | None`` (the key may then be absent, meaning None). Keys the shape
does not know are ignored, so a newer daemon may add some. A field whose default is
None is omitted from the JSON while it is None.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar

from vpnd.control.protocol import Json, ProtocolError


class Shape(Protocol):
    """A dataclass the codec can carry."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


S = TypeVar("S", bound=Shape)


def encode(shape: Shape) -> Json:
    """The JSON object of ``shape`` (fields in declaration order). A field added later
    with a default of None is left out while it is None, so older replies keep their
    exact bytes."""
    return _encode_fields(shape)


def _encode_fields(obj: Any) -> Json:
    return {
        f.name: _encode_value(value)
        for f in dataclasses.fields(obj)
        if (value := getattr(obj, f.name)) is not None or f.default is not None
    }


def _encode_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_fields(value)
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return dict(value)
    return value


def decode(cls: type[S], doc: object, what: str) -> S:
    """Build a ``cls`` from a decoded JSON object; ``what`` names it in errors."""
    if not isinstance(doc, Mapping):
        raise ProtocolError(f"{what} is not an object")
    values: dict[str, object] = {}
    for name, hint in _hints(cls).items():
        if name not in doc:
            if _optional_of(hint) is None:
                raise ProtocolError(f"{what} lacks {name!r}")
            values[name] = None
            continue
        values[name] = _decode_value(hint, doc[name], f"{what}.{name}")
    return cls(**values)


@functools.cache
def _hints(cls: type[Shape]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_of(hint: Any) -> Any | None:
    """``X`` for a hint ``X | None``; None for any other hint."""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _decode_value(hint: Any, value: object, where: str) -> object:
    inner = _optional_of(hint)
    if inner is not None:
        return None if value is None else _decode_value(inner, value, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return decode(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is list:
        return _decode_list(typing.get_args(hint)[0], value, where)
    if origin is dict:
        return _decode_counts(typing.get_args(hint), value, where)
    check = _SCALARS.get(hint)
    if check is None:
        raise TypeError(f"the control codec cannot carry {hint!r} ({where})")
    return check(value, where)


def _decode_list(item: Any, value: object, where: str) -> list[object]:
    if isinstance(item, type) and dataclasses.is_dataclass(item):
        if not isinstance(value, list):
            raise ProtocolError(f"{where} is not a list")
        # Items are named by the field alone ("peers[3]"): short enough to read.
        name = where.rpartition(".")[2]
        return [decode(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if item is not str:
        raise TypeError(f"the control codec cannot carry a list of {item!r} ({where})")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{where} is not a list of strings")
    return list(value)


def _decode_counts(args: tuple[Any, ...], value: object, where: str) -> dict[str, int]:
    if args != (str, int):
        raise TypeError(f"the control codec cannot carry a dict of {args!r} ({where})")
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and _is_int(v) for k, v in value.items()
    ):
        raise ProtocolError(f"{where} is not an object of integer counts")
    return dict(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} is not a string")
    return value


def _integer(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{where} is not an integer")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{where} is not a number")
    if not math.isfinite(value):
        raise ProtocolError(f"{where} is not a finite number")
    return float(value)


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} is not true or false")
    return value


_SCALARS: dict[Any, Any] = {str: _text, int: _integer, float: _number, bool: _flag}
