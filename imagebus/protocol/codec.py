"""msgpack encoding of the typed messages in `messages`.

Decoding checks every field's type, so a malformed or hostile message becomes a
`ProtocolError` the receiver logs and drops, never an exception deep inside it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that does not decode to the expected type."""


def encode(message: Any) -> bytes:
    return msgpack.packb(_plain(message), use_bin_type=True)


_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})


def _plain(value: Any) -> Any:
    """A message as plain maps and lists: what dataclasses.asdict gives, a few times
    faster (these messages hold nothing that needs deep-copying)."""
    cls = type(value)
    if cls in _SCALARS:
        return value
    if hasattr(cls, "__dataclass_fields__"):
        plain = {}
        message_type: Any = cls
        for name in _field_names(message_type):
            field_value = getattr(value, name)
            plain[name] = field_value if type(field_value) in _SCALARS else _plain(field_value)
        return plain
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@cache
def _field_names(cls: Any) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def decode(cls: type[T], payload: bytes) -> T:
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not valid msgpack: {exc}") from None
    return from_dict(cls, data)


def from_dict(cls: type[T], data: Any) -> T:
    hint: Any = cls
    return typing.cast(T, _converter(hint)(data, cls.__name__))


# A converter checks a decoded value against a type hint and builds the typed value;
# one is made per hint, once, so decoding does no type introspection.
Converter = Callable[[Any, str], Any]


@cache
def _converter(hint: Any) -> Converter:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_converter(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass_converter(typing.cast(type, hint))
    if origin in (list, tuple):
        return _sequence_converter(hint, origin)
    if origin is dict:  # a free-form document (a JSON Schema): its values are not checked
        return _instance_of(dict)
    if hint is Any:
        return lambda value, where: value
    if hint is float:
        return _to_float
    if hint is int:
        return _to_int
    if isinstance(hint, type):
        return _instance_of(hint)
    raise TypeError(f"no converter for {hint!r}")


def _union_converter(hint: Any) -> Converter:
    options = typing.get_args(hint)
    optional = type(None) in options
    converters = [_converter(option) for option in options if option is not type(None)]

    def convert(value: Any, where: str) -> Any:
        if value is None and optional:
            return None
        for converter in converters:
            try:
                return converter(value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: unexpected {type(value).__name__}")

    return convert


def _dataclass_converter(cls: type) -> Converter:
    hints = typing.get_type_hints(cls)
    fields = [
        (
            f.name,
            _converter(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            f"{cls.__name__}.{f.name}",
        )
        for f in dataclasses.fields(cls)
    ]

    def convert(data: Any, where: str) -> Any:
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for name, converter, required, field_where in fields:
            if name in data:
                kwargs[name] = converter(data[name], field_where)
            elif required:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
        return cls(**kwargs)

    return convert


def _sequence_converter(hint: Any, origin: Any) -> Converter:
    (item,) = typing.get_args(hint)[:1] or (Any,)
    convert_item = _converter(item)

    def convert(value: Any, where: str) -> Any:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list")
        converted = [convert_item(v, where) for v in value]
        return tuple(converted) if origin is tuple else converted

    return convert


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ProtocolError(f"{where}: expected float, got {type(value).__name__}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ProtocolError(f"{where}: expected int, got {type(value).__name__}")


def _instance_of(hint: type) -> Converter:
    def convert(value: Any, where: str) -> Any:
        if isinstance(value, hint):
            return value
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")

    return convert
