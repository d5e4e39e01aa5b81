"""arq's ``job_serializer``/``job_deserializer``: msgpack through ``broker.codec``, never pickle.

arq hands the serializer a map: a job (``t`` try, ``f`` function, ``a`` args, ``k`` kwargs, ``et`` enqueue
time) or a result (the same plus ``s`` success, ``r`` the return value or the exception, times, queue,
id). Tensors in either become the codec's tensor ext type: raw bytes with dtype and shape. A failed job's
exception travels as ``{"__error__": kind, "message": ..., "request_id": ...}`` and comes back as one of
``errors.FAILURE_KINDS`` (or arq's own ``JobExecutionFailed``, a cancellation, a timeout); any other kind
comes back as ``RemoteError`` naming it. Nothing read from Redis is unpickled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from arq.worker import JobExecutionFailed

from broker.codec import pack, unpack
from coordinator.service.errors import FAILURE_KINDS, JobFailed, RemoteError

ERROR_FIELD = "__error__"

_ARQ_FAILURES: dict[str, Callable[[str], BaseException]] = {
    "JobExecutionFailed": JobExecutionFailed,
    "CancelledError": lambda _msg: asyncio.CancelledError(),
    "TimeoutError": TimeoutError,
}


def encode_error(exc: BaseException) -> dict[str, str]:
    kind = type(exc).__name__
    message = exc.message if isinstance(exc, JobFailed) else str(exc)
    request_id = exc.request_id if isinstance(exc, JobFailed) else ""
    return {ERROR_FIELD: kind, "message": message or kind, "request_id": request_id}


def decode_error(wire: dict[str, Any]) -> BaseException:
    kind, message = str(wire.get(ERROR_FIELD, "")), str(wire.get("message", ""))
    if kind in FAILURE_KINDS:
        return FAILURE_KINDS[kind](message, request_id=str(wire.get("request_id", "")))
    if kind in _ARQ_FAILURES:
        return _ARQ_FAILURES[kind](message)
    return RemoteError(f"{kind}: {message}", request_id=str(wire.get("request_id", "")))


def job_serializer(data: dict[str, Any]) -> bytes:
    if isinstance(data.get("r"), BaseException):
        data = {**data, "r": encode_error(data["r"])}
    return pack(data)


def job_deserializer(raw: bytes) -> dict[str, Any]:
    data = unpack(raw)
    if not isinstance(data, dict):
        raise ValueError(f"an arq payload must be a map, got {type(data).__name__}")
    r = data.get("r")
    if data.get("s") is False and isinstance(r, dict) and ERROR_FIELD in r:
        data["r"] = decode_error(r)
    return data
