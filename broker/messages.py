"""Message types that travel on the streams.

Each message is a frozen dataclass with a type tag ``TYPE``, registered with ``wire`` (the wire form, the schema
version, decoding that ignores unknown fields, rejects missing ones and never unpickles). Tensors are
``dict[str, np.ndarray]`` and travel as the codec's tensor ext type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import numpy as np

from .codec import DEFAULT_LIMITS, Limits
from .wire import SCHEMA_VERSION, decode_any, decode_as, encode, from_dict, register, register_nested, to_dict

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
    recovered: str = ""  # what its worker recovered from before it ran (a lost page whose cache it restored)
    recovery_ms: float = 0.0  # how long that recovery took


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
    kind: str = ""  # what the shard holds (the plan stage's kind: "attention", "vision", ...), copied into its events
    dtype: str = ""  # the shard file's precision ("fp32", "q4", ...), copied into its events
    providers: tuple[str, ...] = ()  # the execution providers that may run it (empty: any); auto picks among them


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
    nodes: int = 0  # the session's nodes after onnxruntime's optimizations (0: not reported)
    cpu_nodes: int = 0  # of those, the nodes onnxruntime placed on its CPU provider besides the one asked for
    cpu_ops: str = ""  # their op types and counts, most first ("Shape x62, Gather x54"); "" on WASM


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
    kind: str = ""  # the assignment's kind: history groups by it besides shard_type
    dtype: str = ""  # the shard file's precision, as assigned


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


@dataclass(frozen=True, slots=True)
class PrecisionEvent:
    """One shard's precision: the one it runs in, and one measured candidate (``dtype="auto"``) or the one
    asked for (``measured`` empty, the figures NaN). Written by the coordinator once its shards are loaded."""

    TYPE: ClassVar[str] = "ev.precision"
    event_id: str
    ts_ms: float
    model_name: str
    plan_id: str
    shard_index: int
    dtype: str  # what the shard runs in
    measured: str  # the candidate these figures are of ("" where the dtype was asked for)
    top1: float  # next-token top-1 agreement with all-float32 on the calibration set (NaN: no logits)
    max_diff: float
    relative_diff: float
    positions: int
    reason: str


@dataclass(frozen=True, slots=True)
class DagRequest:
    """A request on a DAG plan (component sharding): its inputs, kept in its request hash until it finishes,
    so that a restarted coordinator with the same id drives its segments on (``coordinator.runtime.dag``)."""

    TYPE: ClassVar[str] = "dag-request"
    request_id: str
    plan_id: str
    tensors: Tensors
    ts_ms: float


Event = ExecutionEvent | RequestEvent | RecoveryEvent | PrecisionEvent

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
    | PrecisionEvent
    | DagRequest
)
M = TypeVar("M", bound=Message)

register(
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
    PrecisionEvent,
    DagRequest,
)
register_nested("trace", StageTrace)


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    return decode_any(data, limits)  # type: ignore[no-any-return]


__all__ = [
    "SCHEMA_VERSION",
    "Assignment",
    "AssignmentReply",
    "DagRequest",
    "DeadLetter",
    "Event",
    "Inject",
    "InjectReply",
    "Restart",
    "ExecutionEvent",
    "PrecisionEvent",
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
    "from_dict",
    "to_dict",
]
