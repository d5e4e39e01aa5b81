"""msgpack codec for messages, with tensors as an ext type.

A tensor is ext type 1 whose payload is a msgpack array ``[dtype, shape, data]``: ``dtype`` a numpy
dtype name from ``DTYPES``, ``shape`` a list of non-negative ints, ``data`` the raw little-endian,
C-ordered bytes. Decoding never unpickles and checks every size against ``Limits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import MessageError, TensorError

TENSOR_EXT = 1

DTYPES: frozenset[str] = frozenset(
    {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds applied while decoding."""

    max_message_bytes: int = 512 * 1024 * 1024
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_rank: int = 8


DEFAULT_LIMITS = Limits()


def _tensor_payload(arr: np.ndarray) -> bytes:
    name = arr.dtype.name
    if name not in DTYPES:
        raise TensorError(f"dtype {name} cannot be sent; supported: {sorted(DTYPES)}")
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False) if arr.dtype.byteorder == ">" else arr
    data = np.ascontiguousarray(le).tobytes()
    packed: bytes = msgpack.packb([name, list(arr.shape), data], use_bin_type=True)
    return packed


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(TENSOR_EXT, _tensor_payload(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode_tensor(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    try:
        dtype_name, shape, data = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData) as e:
        raise TensorError(f"malformed tensor payload: {e}") from e
    if dtype_name not in DTYPES:
        raise TensorError(f"unsupported tensor dtype {dtype_name!r}")
    if not isinstance(shape, list) or len(shape) > limits.max_rank:
        raise TensorError(f"tensor rank must be <= {limits.max_rank}, got shape {shape!r}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TensorError(f"tensor shape must be non-negative ints, got {shape!r}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if expected > limits.max_tensor_bytes:
        raise TensorError(f"tensor of {expected} bytes exceeds limit {limits.max_tensor_bytes}")
    if not isinstance(data, bytes) or len(data) != expected:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise TensorError(f"tensor {dtype_name}{shape} needs {expected} bytes, got {got}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(obj: Any) -> bytes:
    """Encode a msgpack-able structure; numpy arrays become tensor ext values."""
    packed: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return packed


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode what ``pack`` produced, enforcing ``limits``."""
    if len(data) > limits.max_message_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds limit {limits.max_message_bytes}")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code != TENSOR_EXT:
            raise MessageError(f"unknown msgpack ext type {code}")
        return decode_tensor(payload, limits)

    try:
        return msgpack.unpackb(
            data,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=False,
            max_bin_len=limits.max_message_bytes,
            max_str_len=16 * 1024 * 1024,
        )
    except MessageError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise MessageError(f"malformed message: {e}") from e
