"""Message types of generation sessions: one step of a session through the shards, its result, its failure,
and its end. Registered with the message codec on import, like ``broker.messages``' own types.

A session is pinned to one worker per stage: ``SessionStep.route[i]`` is the direct stream of the worker
whose page holds stage ``i``'s KV cache for the session (sticky routing), ``stages[i]`` the stage stream
it serves that stage under. ``states`` names each stage's cache tensors (``StateSlot``): the page feeds
them from what it holds (an empty past when ``fresh``), keeps what the stage returns for them, and only
the other outputs travel on. A page that holds as many sessions as it may refuses a new one
(``SessionRefusal.LIMIT``); a step for a session the page does not hold (its browser was restarted, the
session expired) is refused with ``SessionRefusal.MISSING`` and the coordinator replays the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

from .messages import StageTrace, Tensors
from .wire import register

if TYPE_CHECKING:
    from .streams import Broker


class SessionRefusal(StrEnum):
    """Why a page refused a session step (``SessionFailure.refusal``; empty: it was not refused)."""

    LIMIT = "limit"  # the page holds as many sessions as it may: never retried on that worker
    MISSING = "missing"  # the page does not hold the session's cache: replay the session's history


@dataclass(frozen=True, slots=True)
class StateSlot:
    """One cache tensor of stage ``stage_index``: fed as ``input_name``, returned as ``output_name``,
    ``empty_shape`` (length 0 along the sequence axis) before the first step."""

    TYPE: ClassVar[str] = "state-slot"
    stage_index: int
    input_name: str
    output_name: str
    dtype: str
    empty_shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SessionStep:
    """One step of session ``session_id`` (``step`` 0 is the prefill) at stage ``stage_index``."""

    TYPE: ClassVar[str] = "session-step"
    session_id: str
    step: int
    plan_id: str
    stage_index: int
    route: tuple[str, ...]  # per stage: the direct stream of the worker holding its cache
    stages: tuple[str, ...]  # per stage: its stage stream (which shard the worker runs)
    reply_stream: str
    tensors: Tensors
    states: tuple[dict[str, object], ...]  # StateSlot fields, every stage's
    fresh: bool  # start from an empty cache (prefill, or a replay on a new holder)
    enqueued_ms: float
    attempt: int = 1
    trace: tuple[StageTrace, ...] = ()

    def slots(self, stage_index: int) -> tuple[StateSlot, ...]:
        """The cache tensors of stage ``stage_index``."""
        out = []
        for s in self.states:
            slot = StateSlot(
                int(s["stage_index"]),  # type: ignore[call-overload]
                str(s["input_name"]),
                str(s["output_name"]),
                str(s["dtype"]),
                tuple(int(d) for d in s["empty_shape"]),  # type: ignore[attr-defined]
            )
            if slot.stage_index == stage_index:
                out.append(slot)
        return tuple(out)


def state_entry(slot: StateSlot) -> dict[str, object]:
    """``slot`` as it travels in ``SessionStep.states``."""
    return {
        "stage_index": slot.stage_index,
        "input_name": slot.input_name,
        "output_name": slot.output_name,
        "dtype": slot.dtype,
        "empty_shape": list(slot.empty_shape),
    }


@dataclass(frozen=True, slots=True)
class SessionResult:
    """The last stage's non-state outputs of one session step, sent to the coordinator's reply stream."""

    TYPE: ClassVar[str] = "session-result"
    session_id: str
    step: int
    plan_id: str
    tensors: Tensors
    trace: tuple[StageTrace, ...]
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class SessionFailure:
    """A session step that could not run at ``stage_index`` on ``worker_id``; ``kind`` a ``FailureKind``."""

    TYPE: ClassVar[str] = "session-failure"
    session_id: str
    step: int
    plan_id: str
    stage_index: int
    worker_id: str
    kind: str
    error: str
    refusal: str = ""  # a SessionRefusal value, or empty
    trace: tuple[StageTrace, ...] = field(default=())
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """Free session ``session_id``'s cache in the page of the worker whose direct stream this is sent to."""

    TYPE: ClassVar[str] = "session-end"
    session_id: str


@dataclass(frozen=True, slots=True)
class SessionHistory:
    """What a coordinator keeps of a session in Redis, so one with the same session id can resume it: the
    prompt and the tokens generated so far (the position is their total length)."""

    plan_id: str
    prompt: tuple[int, ...]
    generated: tuple[int, ...]

    @property
    def position(self) -> int:
        return len(self.prompt) + len(self.generated)


async def save_history(broker: Broker, session_id: str, history: SessionHistory, ttl_s: int) -> None:
    """The ``record session step`` change: one MULTI writing the session's hash and refreshing its TTL."""
    key = broker.keys.session(session_id)
    fields = {
        "plan": history.plan_id,
        "prompt": json.dumps(list(history.prompt)),
        "generated": json.dumps(list(history.generated)),
        "position": str(history.position),
    }
    async with broker.transaction("record session step") as tx:
        tx.pipe.hset(key, mapping=fields)
        tx.pipe.expire(key, ttl_s)


async def load_history(broker: Broker, session_id: str) -> SessionHistory | None:
    """The session's stored history, or None when there is none (never started, expired, forgotten)."""
    row = await broker.hash_fields(broker.keys.session(session_id))
    if not row:
        return None
    text = {k: v.decode() for k, v in row.items()}
    return SessionHistory(text["plan"], tuple(json.loads(text["prompt"])), tuple(json.loads(text["generated"])))


SessionMessage = SessionStep | SessionResult | SessionFailure | SessionEnd

register(SessionStep, SessionResult, SessionFailure, SessionEnd)

__all__ = [
    "SessionEnd",
    "SessionFailure",
    "SessionMessage",
    "SessionRefusal",
    "SessionResult",
    "SessionHistory",
    "SessionStep",
    "StateSlot",
    "load_history",
    "save_history",
    "state_entry",
]
