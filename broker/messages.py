"""Message types that travel on the streams.

Each message is a frozen dataclass with a type tag ``TYPE`` and a schema version ``VERSION``.
``encode`` writes ``{"t": TYPE, "v": VERSION, **fields}`` with ``codec.pack``; ``decode`` ignores
unknown fields, rejects missing required ones with ``SchemaError`` and never unpickles.
Tensors are ``dict[str, np.ndarray]`` and travel as the codec's tensor ext type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from .codec import DEFAULT_LIMITS, Limits, pack, unpack
from .errors import SchemaError

SCHEMA_VERSION = 1

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class StageTrace:
    """What one shard execution measured; appended to the job as it moves down the chain."""

    TYPE: ClassVar[str] = "trace"
    shard_index: int
    worker_id: str
    browser: str
    user_agent: str
    execution_provider: str
    adapter: str
    kernel_ms: float
    queue_ms: float
    worker_ms: float
    bytes_in: int
    bytes_out: int
    attempt: int = 1
    # Where the time went (``benchmarks/overhead_breakdown.py``): wall-clock instants in epoch ms, the worker's
    # clock for the first group, the page's (``performance.timeOrigin + now()``) for ``page_*``; 0.0 = not
    # measured. A stage run in the same page right after the one before it (``fused``) has no read, send,
    # receive or hand-off of its own: those marks are 0.0 and its ``queue_ms`` is 0.
    read_ms: float = 0.0  # the job came out of XREADGROUP, decoded
    decode_ms: float = 0.0  # a duration: decoding the entry, inside the read
    send_ms: float = 0.0  # the frame to the page is being built
    sent_ms: float = 0.0  # the frame was written to the WebSocket
    page_recv_ms: float = 0.0  # the page's message handler started
    page_fed_ms: float = 0.0  # the inputs are onnxruntime tensors: session.run starts
    page_ran_ms: float = 0.0  # session.run returned
    page_read_ms: float = 0.0  # the outputs were read (and carried on)
    page_sent_ms: float = 0.0  # the result frame was built and is being sent
    result_ms: float = 0.0  # the result frame was read back and decoded by the worker
    handoff_ms: float = 0.0  # the hand-off script is being called
    fused: bool = False  # ran in the same page op as the stage before it, no stream hop between them


@dataclass(frozen=True, slots=True)
class ShardJob:
    """One stage of one request: run ``route[stage_index]``'s shard on ``tensors``."""

    TYPE: ClassVar[str] = "job"
    request_id: str
    plan_id: str
    stage_index: int
    route: tuple[str, ...]
    reply_stream: str
    tensors: Tensors
    enqueued_ms: float
    attempt: int = 1
    trace: tuple[StageTrace, ...] = ()
    target_platform: str = ""  # run on this execution provider instead of the stage's (change platform)


@dataclass(frozen=True, slots=True)
class ShardResult:
    """The last stage's outputs, sent to the coordinator's reply stream."""

    TYPE: ClassVar[str] = "result"
    request_id: str
    plan_id: str
    tensors: Tensors
    trace: tuple[StageTrace, ...]
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class ShardFailure:
    """A stage that could not run; ``kind`` is ``retryable``, ``kernel`` or ``input``."""

    TYPE: ClassVar[str] = "failure"
    request_id: str
    plan_id: str
    stage_index: int
    worker_id: str
    attempt: int
    kind: str
    error: str
    trace: tuple[StageTrace, ...] = ()
    tensors: Tensors = field(default_factory=dict)  # the failed stage's inputs, to try it again
    route: tuple[str, ...] = ()
    reply_stream: str = ""
    platform: str = ""


@dataclass(frozen=True, slots=True)
class Assignment:
    """Tell a worker to load a shard and consume its stage stream."""

    TYPE: ClassVar[str] = "assign"
    assignment_id: str
    plan_id: str
    shard_index: int
    stage_stream: str
    onnx_sha256: str
    input_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    platform: str
    reply_stream: str
    model_name: str = ""
    shard_type: str = "layer"


@dataclass(frozen=True, slots=True)
class Release:
    """Tell a worker to stop serving a stage and drop its session."""

    TYPE: ClassVar[str] = "release"
    stage_stream: str


@dataclass(frozen=True, slots=True)
class Restart:
    """Tell a worker to restart its browser and reload its shards."""

    TYPE: ClassVar[str] = "restart"
    reason: str
    since_ms: float = 0.0  # skip if the browser was (re)started after this time: it already was restarted


@dataclass(frozen=True, slots=True)
class Inject:
    """Fault injection for tests and ``xshard fault-test``: make the page throw in its next ``count`` kernels
    (``kernel-error``). Only a worker started with ``--allow-fault-injection`` accepts it; either way it answers
    with an ``InjectReply`` on ``reply_stream`` (when given), so the sender waits for the fault to be armed."""

    TYPE: ClassVar[str] = "inject"
    kind: str
    count: int
    inject_id: str = ""
    reply_stream: str = ""
    shard_index: int = -1  # only kernels of this shard throw (-1: any shard's)


@dataclass(frozen=True, slots=True)
class InjectReply:
    """A worker's answer to an ``Inject``: armed, or refused and why."""

    TYPE: ClassVar[str] = "inject.reply"
    inject_id: str
    worker_id: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A stage that exhausted its recovery; enough to replay it."""

    TYPE: ClassVar[str] = "dead"
    request_id: str
    plan_id: str
    stage_index: int
    route: tuple[str, ...]
    reply_stream: str
    tensors: Tensors
    reason: str
    error: str
    attempts: int
    workers_tried: tuple[str, ...]
    ts_ms: float
    trace: tuple[StageTrace, ...] = ()


@dataclass(frozen=True, slots=True)
class AssignmentReply:
    """A worker's answer to an ``Assignment``."""

    TYPE: ClassVar[str] = "assigned"
    assignment_id: str
    worker_id: str
    ok: bool
    error: str
    execution_provider: str
    adapter: str
    user_agent: str
    load_ms: float
    note: str = ""
    wasm_threads: int = 0  # onnxruntime-web threads of the worker's page (0: not reported)


# -- events: appended to the events stream by workers and coordinators, written to DuckDB by the
#    history consumer only. ``event_id`` makes writing them idempotent.


@dataclass(frozen=True, slots=True)
class ExecutionEvent:
    """One shard execution, successful or not (written by the worker that ran it)."""

    TYPE: ClassVar[str] = "ev.exec"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_index: int
    shard_type: str
    worker_id: str
    browser: str
    platform: str
    adapter: str
    kernel_ms: float
    queue_ms: float
    transfer_ms: float
    bytes_in: int
    bytes_out: int
    attempt: int
    outcome: str  # "success" | "error"
    error: str = ""


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One request as the coordinator saw it end: result or error."""

    TYPE: ClassVar[str] = "ev.request"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_type: str
    num_shards: int
    coordinator_id: str
    latency_ms: float
    kernel_ms: float
    attempts: int
    outcome: str  # "success" | "error" | "dead_letter"
    error: str = ""


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """A failure and the rung of the recovery ladder that handled it."""

    TYPE: ClassVar[str] = "ev.recovery"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_index: int
    worker_id: str
    browser: str
    platform: str
    failure: str  # "crash" | "hang" | "kernel-error" | "worker-lost" | "broker-lost" | ...
    action: str  # "retry" | "restart" | "reroute" | "change_platform" | "redistribute" | "dead_letter" | ...
    success: bool
    duration_ms: float
    error: str = ""


Event = ExecutionEvent | RequestEvent | RecoveryEvent

Message = (
    ShardJob
    | ShardResult
    | ShardFailure
    | Assignment
    | Release
    | AssignmentReply
    | StageTrace
    | Restart
    | Inject
    | InjectReply
    | DeadLetter
    | ExecutionEvent
    | RequestEvent
    | RecoveryEvent
)
M = TypeVar("M", bound=Message)

_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        ShardJob,
        ShardResult,
        ShardFailure,
        Assignment,
        Release,
        AssignmentReply,
        StageTrace,
        Restart,
        Inject,
        InjectReply,
        DeadLetter,
        ExecutionEvent,
        RequestEvent,
        RecoveryEvent,
    )
}


def _fields_of(msg: Message) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def to_dict(msg: Message) -> dict[str, Any]:
    body = _fields_of(msg)
    if "trace" in body and not isinstance(msg, StageTrace):
        body["trace"] = [_fields_of(t) for t in body["trace"]]
    body["t"] = msg.TYPE
    body["v"] = SCHEMA_VERSION
    return body


def _build(cls: type, tag: str, body: dict[str, Any]) -> Any:
    """An instance of ``cls`` from ``body``: unknown fields ignored, missing required ones refused."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            value = body[f.name]
            if f.name == "trace" and cls is not StageTrace:
                value = tuple(_trace(t, tag) for t in value or ())
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{tag} message lacks required field {f.name!r}")
    return cls(**kwargs)


def _trace(t: Any, tag: str) -> StageTrace:
    if isinstance(t, StageTrace):
        return t
    if not isinstance(t, dict):
        raise SchemaError(f"{tag} message: a trace entry must be a map, got {type(t).__name__}")
    return _build(StageTrace, f"{tag} trace", t)  # type: ignore[no-any-return]


def from_dict(body: Any) -> Message:
    if not isinstance(body, dict):
        raise SchemaError(f"message must be a map, got {type(body).__name__}")
    tag = body.get("t")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise SchemaError(f"unknown message type {tag!r}")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{tag} message has schema version {version!r}, expected {SCHEMA_VERSION}")
    return _build(cls, str(tag), body)  # type: ignore[no-any-return]


def encode(msg: Message) -> bytes:
    return pack(to_dict(msg))


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    return from_dict(unpack(data, limits))


def decode_as(data: bytes, cls: type[M], limits: Limits = DEFAULT_LIMITS) -> M:
    msg = decode(data, limits)
    if not isinstance(msg, cls):
        raise SchemaError(f"expected a {cls.TYPE} message, got {msg.TYPE}")
    return msg


__all__ = [
    "SCHEMA_VERSION",
    "Assignment",
    "AssignmentReply",
    "DeadLetter",
    "Event",
    "Inject",
    "InjectReply",
    "Restart",
    "ExecutionEvent",
    "RecoveryEvent",
    "RequestEvent",
    "Message",
    "Release",
    "ShardFailure",
    "ShardJob",
    "ShardResult",
    "StageTrace",
    "Tensors",
    "decode",
    "decode_as",
    "encode",
]
