"""msgpack encoding of the typed messages in `messages`.

Decoding checks every field's type, so a malformed or hostile message becomes a
`ProtocolError` the receiver logs and drops, never an exception deep inside it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message that does not decode to the expected type."""


def encode(message: Any) -> bytes:
    return msgpack.packb(dataclasses.asdict(message), use_bin_type=True)


def decode(cls: type[T], payload: bytes) -> T:
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not valid msgpack: {exc}") from None
    return from_dict(cls, data)


@cache
def _field_types(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def from_dict(cls: type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    kwargs: dict[str, Any] = {}
    for name, hint, required in _field_types(cls):
        if name not in data:
            if required:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
            continue
        kwargs[name] = _convert(hint, data[name], f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: unexpected {type(value).__name__}")
    if dataclasses.is_dataclass(hint):
        return from_dict(typing.cast(type, hint), value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"{where}: expected a list")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        converted = [_convert(item, v, where) for v in value]
        return tuple(converted) if origin is tuple else converted
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ProtocolError(
        f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}"
    )
