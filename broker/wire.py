"""The wire form of every message: ``{"t": TYPE, "v": SCHEMA_VERSION, **fields}`` packed with ``codec.pack``.

Message modules (``messages``, ``sessions``) define frozen dataclasses with a ``TYPE`` tag and call ``register``
for them; ``register_nested`` names a field whose items are themselves dataclasses (a job's ``trace`` of
``StageTrace``s). ``decode`` ignores unknown fields, rejects missing required ones with ``SchemaError`` and never
unpickles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .codec import DEFAULT_LIMITS, Limits, pack, unpack
from .errors import SchemaError

SCHEMA_VERSION = 1

_TYPES: dict[str, type] = {}
_NESTED: dict[str, type] = {}  # field name -> the dataclass each of its items is

T = TypeVar("T")


def register(*classes: type) -> None:
    """Make message classes decodable by their ``TYPE`` tag (a tag names one class only)."""
    for cls in classes:
        tag = cls.TYPE  # type: ignore[attr-defined]
        if _TYPES.get(tag, cls) is not cls:
            raise SchemaError(f"message type {tag!r} is registered twice")
        _TYPES[tag] = cls


def register_nested(field_name: str, cls: type) -> None:
    """Items of ``field_name`` (in any message) travel as maps and decode as ``cls``."""
    _NESTED[field_name] = cls


def _fields_of(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def to_dict(msg: Any) -> dict[str, Any]:
    body = _fields_of(msg)
    for name, item_cls in _NESTED.items():
        if name in body and not isinstance(msg, item_cls):
            body[name] = [_fields_of(t) for t in body[name]]
    body["t"] = msg.TYPE
    body["v"] = SCHEMA_VERSION
    return body


def _build(cls: type, tag: str, body: dict[str, Any]) -> Any:
    """An instance of ``cls`` from ``body``: unknown fields ignored, missing required ones refused."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            value = body[f.name]
            item_cls = _NESTED.get(f.name)
            if item_cls is not None and item_cls is not cls:
                value = tuple(_item(t, item_cls, f"{tag} {f.name}") for t in value or ())
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{tag} message lacks required field {f.name!r}")
    return cls(**kwargs)


def _item(t: Any, cls: type, where: str) -> Any:
    if isinstance(t, cls):
        return t
    if not isinstance(t, dict):
        raise SchemaError(f"{where}: an entry must be a map, got {type(t).__name__}")
    return _build(cls, where, t)


def from_dict(body: Any) -> Any:
    if not isinstance(body, dict):
        raise SchemaError(f"message must be a map, got {type(body).__name__}")
    tag = body.get("t")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise SchemaError(f"unknown message type {tag!r}")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{tag} message has schema version {version!r}, expected {SCHEMA_VERSION}")
    return _build(cls, str(tag), body)


def encode(msg: Any) -> bytes:
    return pack(to_dict(msg))


def decode_any(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    return from_dict(unpack(data, limits))


def decode_as(data: bytes, cls: type[T], limits: Limits = DEFAULT_LIMITS) -> T:
    msg = decode_any(data, limits)
    if not isinstance(msg, cls):
        raise SchemaError(f"expected a {cls.TYPE} message, got {msg.TYPE}")  # type: ignore[attr-defined]
    return msg
