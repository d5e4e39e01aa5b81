"""Message types that travel on the streams.

The stage messages live here (a hop, its result or failure, a dead letter); a worker's control messages in
``control``, the history's events in ``events``; ``Message`` is the union of them all, ``decode`` reads any.
Each message is a frozen dataclass with a type tag ``TYPE``, registered with ``wire`` (the wire form, the schema
version, decoding that ignores unknown fields, rejects missing ones and never unpickles). Tensors are
``dict[str, np.ndarray]`` and travel as the codec's tensor ext type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, TypeVar

import numpy as np

from .codec import DEFAULT_LIMITS, Limits
from .control import Assignment, AssignmentReply, Inject, InjectReply, Release, Restart
from .errors import SchemaError
from .events import ExecutionEvent, PrecisionEvent, RecoveryEvent, RequestEvent
from .kinds import FailureKind
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
class StateSlot:
    """One cache tensor of stage ``stage_index`` of a session: fed as ``input_name``, returned as
    ``output_name``, ``empty_shape`` (length 0 along the sequence axis) before the first step."""

    TYPE: ClassVar[str] = "state-slot"
    stage_index: int
    input_name: str
    output_name: str
    dtype: str
    empty_shape: tuple[int, ...]

    def as_entry(self) -> dict[str, object]:
        """The slot as it travels in ``StageHop.states``."""
        return {
            "stage_index": self.stage_index,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "dtype": self.dtype,
            "empty_shape": list(self.empty_shape),
        }

    @classmethod
    def of_entry(cls, entry: dict[str, object]) -> StateSlot:
        shape = entry["empty_shape"]
        if not isinstance(shape, list | tuple):
            raise SchemaError(f"state slot empty_shape must be a list, got {shape!r}")
        return cls(
            int(str(entry["stage_index"])),
            str(entry["input_name"]),
            str(entry["output_name"]),
            str(entry["dtype"]),
            tuple(int(d) for d in shape),
        )


@dataclass(frozen=True, slots=True)
class StageHop:
    """One stage of one piece of work: run ``route[stage_index]``'s shard on ``tensors``.

    The same message carries a request's job and a generation session's step. A job (``session_id`` empty)
    goes to the stage stream, where any worker serving the stage takes it. A session step goes to the direct
    stream of the worker whose page holds that stage's cache (``route[i]``; ``stages[i]`` is the stage stream
    it serves the stage under), with each stage's cache tensors in ``states`` and ``fresh`` for an empty cache
    (the prefill, a replay). ``restore_stage`` names the stage whose new holder (it replaced a lost worker)
    rebuilds its cache from the copy in Redis before it runs the step."""

    TYPE: ClassVar[str] = "hop"
    request_id: str  # the request; for a session step "<session id>#<step>"
    plan_id: str
    stage_index: int
    route: tuple[str, ...]
    reply_stream: str
    tensors: Tensors
    enqueued_ms: float
    attempt: int = 1
    trace: tuple[StageTrace, ...] = ()
    target_platform: str = ""  # run on this execution provider instead of the stage's (change platform)
    session_id: str = ""
    step: int = 0  # the session's step (0: the prefill)
    stages: tuple[str, ...] = ()
    states: tuple[dict[str, object], ...] = ()  # StateSlot.as_entry() of every stage's cache tensors
    fresh: bool = False
    restore_stage: int = -1

    @property
    def is_session(self) -> bool:
        return bool(self.session_id)

    @property
    def restoring(self) -> bool:
        """Whether this hop's holder takes its stage over: its cache from the copy in Redis first."""
        return self.restore_stage == self.stage_index

    def slots(self, stage_index: int) -> tuple[StateSlot, ...]:
        """The cache tensors of stage ``stage_index``."""
        return tuple(s for s in map(StateSlot.of_entry, self.states) if s.stage_index == stage_index)

    def onward(self, stage_index: int, tensors: Tensors, trace: tuple[StageTrace, ...], at_ms: float) -> StageHop:
        """The hop to ``stage_index`` with what the stages before it produced (a job's is its first attempt)."""
        attempt = self.attempt if self.is_session else 1
        return replace(
            self,
            stage_index=stage_index,
            tensors=tensors,
            trace=trace,
            enqueued_ms=at_ms,
            attempt=attempt,
            target_platform="",
        )

    def result(self, tensors: Tensors, trace: tuple[StageTrace, ...]) -> StageResult:
        """The last stage's outputs, for the reply stream."""
        return StageResult(self.request_id, self.plan_id, tensors, trace, self.attempt, self.session_id, self.step)

    def again(self, stage_index: int, target_platform: str, at_ms: float) -> StageHop:
        """This job's next attempt at ``stage_index`` (on ``target_platform``, or the stage's when empty)."""
        return replace(
            self, stage_index=stage_index, enqueued_ms=at_ms, attempt=self.attempt + 1, target_platform=target_platform
        )

    def buried(self, reason: str, error: str, workers_tried: tuple[str, ...], at_ms: float) -> DeadLetter:
        """This hop as a dead letter: its recovery ended (``reason``); enough to replay it."""
        return DeadLetter(
            request_id=self.request_id,
            plan_id=self.plan_id,
            stage_index=self.stage_index,
            route=self.route,
            reply_stream=self.reply_stream,
            tensors=self.tensors,
            reason=reason,
            error=error,
            attempts=self.attempt,
            workers_tried=workers_tried,
            ts_ms=at_ms,
            trace=self.trace,
        )

    def failure(self, at: StageFault) -> StageFailure:
        """Stage ``at.stage_index`` could not run on ``at.worker_id``, for the reply stream."""
        return StageFailure(
            request_id=self.request_id,
            plan_id=self.plan_id,
            stage_index=at.stage_index,
            worker_id=at.worker_id,
            attempt=at.attempt or self.attempt,
            kind=at.kind,
            error=at.error,
            trace=at.trace if at.trace is not None else self.trace,
            tensors=at.tensors if at.tensors is not None else ({} if self.is_session else self.tensors),
            route=self.route,
            reply_stream=self.reply_stream,
            platform=at.platform,
            refusal=at.refusal,
            session_id=self.session_id,
            step=self.step,
        )


@dataclass(frozen=True, slots=True)
class StageFault:
    """What a worker knows of a stage that could not run (``StageHop.failure`` makes the message)."""

    stage_index: int
    worker_id: str
    kind: FailureKind
    error: str
    platform: str = ""
    refusal: str = ""  # a session step's ``SessionRefusal`` value, or empty
    attempt: int = 0  # 0: the hop's
    trace: tuple[StageTrace, ...] | None = None  # None: the hop's
    tensors: Tensors | None = None  # the failed stage's inputs; None: the hop's (a job's), none (a session's)


@dataclass(frozen=True, slots=True)
class StageResult:
    """The last stage's outputs, sent to the reply stream (a session step's: its non-state outputs)."""

    TYPE: ClassVar[str] = "result"
    request_id: str
    plan_id: str
    tensors: Tensors
    trace: tuple[StageTrace, ...]
    attempt: int = 1
    session_id: str = ""
    step: int = 0


@dataclass(frozen=True, slots=True)
class StageFailure:
    """A stage that could not run, and why (``kind``); a job's carries the failed stage's inputs, to try it
    again, a session step's the page's ``refusal`` where it refused it."""

    TYPE: ClassVar[str] = "failure"
    request_id: str
    plan_id: str
    stage_index: int
    worker_id: str
    attempt: int
    kind: FailureKind
    error: str
    trace: tuple[StageTrace, ...] = ()
    tensors: Tensors = field(default_factory=dict)
    route: tuple[str, ...] = ()
    reply_stream: str = ""
    platform: str = ""
    refusal: str = ""
    session_id: str = ""
    step: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FailureKind.parse(str(self.kind)))  # the wire holds its string value

    def as_hop(self, at_ms: float) -> StageHop:
        """The failed stage as the job's hop again: its inputs, attempt and trace (a job's failure)."""
        return StageHop(
            self.request_id,
            self.plan_id,
            self.stage_index,
            self.route,
            self.reply_stream,
            self.tensors,
            at_ms,
            attempt=self.attempt,
            trace=self.trace,
        )

    def buried(self, reason: str, at_ms: float) -> DeadLetter:
        """The failed stage as a dead letter, with the inputs it was given."""
        return self.as_hop(at_ms).buried(reason, self.error, (self.worker_id,), at_ms)


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

    def replayed(self, reply_stream: str, at_ms: float) -> StageHop:
        """The buried stage as a hop again (its first attempt), its result to ``reply_stream``."""
        return StageHop(
            self.request_id,
            self.plan_id,
            self.stage_index,
            self.route,
            reply_stream,
            self.tensors,
            at_ms,
            trace=self.trace,
        )


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
    StageHop
    | StageResult
    | StageFailure
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
    StageHop,
    StageResult,
    StageFailure,
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
    "StageFailure",
    "StageFault",
    "StageHop",
    "StageResult",
    "StateSlot",
    "StageTrace",
    "Tensors",
    "decode",
    "decode_as",
    "encode",
    "from_dict",
    "to_dict",
]
