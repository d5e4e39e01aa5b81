"""What only generation sessions have: the end of a session, why a page refuses a step, and the token history
kept in Redis. A session's steps, results and failures are the ``StageHop``, ``StageResult`` and
``StageFailure`` of every stage's work (``broker.messages``), with their session fields set.

A session is pinned to one worker per stage: a step's ``route[i]`` is the direct stream of the worker
whose page holds stage ``i``'s KV cache for the session (sticky routing), ``stages[i]`` the stage stream
it serves that stage under. ``states`` names each stage's cache tensors (``StateSlot``): the page feeds
them from what it holds (an empty past when ``fresh``), keeps what the stage returns for them, and only
the other outputs travel on. A page that holds as many sessions as it may refuses a new one
(``SessionRefusal.LIMIT``); a step for a session the page does not hold (its browser was restarted, the
session expired) is refused with ``SessionRefusal.MISSING``; the coordinator's recovery
(``coordinator.recovery.session``) decides what next.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .codec import unpack
from .keys import MESSAGE_FIELD, STAGE_GROUP
from .messages import Message, encode
from .wire import register

if TYPE_CHECKING:
    from .streams import Broker


class SessionRefusal(StrEnum):
    """Why a page refused a session step (``SessionFailure.refusal``; empty: it was not refused)."""

    LIMIT = "limit"  # the page holds as many sessions as it may: never retried on that worker
    MISSING = "missing"  # the page does not hold the session's cache: replay the session's history


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


register(SessionEnd)

__all__ = [
    "CacheCopy",
    "SessionEnd",
    "SessionRefusal",
    "SessionHistory",
    "copied_step",
    "drop_cache_copies",
    "load_history",
    "move_step",
    "read_cache_copy",
    "save_history",
]


@dataclass(frozen=True, slots=True)
class CacheCopy:
    """The Redis copy of one stage's cache of a session, as of step ``step``: each cache tensor's pieces,
    one per step, in step order (concatenated, the cache)."""

    step: int
    pieces: dict[str, list[np.ndarray]]


async def read_cache_copy(broker: Broker, session_id: str, stage_index: int) -> CacheCopy | None:
    """The copy written by the stage's hand-offs (``Broker.hand_off``'s ``mirror``), or None."""
    row = await broker.hash_fields(broker.keys.mirror(session_id, stage_index))
    if "step" not in row:
        return None
    step = int(row.pop("step"))
    by_name: dict[str, list[tuple[int, np.ndarray]]] = {}
    for field_name, data in row.items():
        name, _, at = field_name.rpartition("@")
        by_name.setdefault(name, []).append((int(at), unpack(data)))
    pieces = {name: [t for _, t in sorted(items, key=lambda p: p[0])] for name, items in by_name.items()}
    return CacheCopy(step, pieces)


async def copied_step(broker: Broker, session_id: str, stage_index: int) -> int | None:
    """The last step the Redis copy of the stage's cache holds, or None when there is none."""
    value = await broker.hash_field(broker.keys.mirror(session_id, stage_index), "step")
    return int(value) if value is not None else None


async def drop_cache_copies(broker: Broker, session_id: str, stages: int) -> None:
    """Delete the session's cache copies (its end)."""
    await broker.delete(*(broker.keys.mirror(session_id, i) for i in range(stages)))


async def move_step(broker: Broker, stream: str, entry_id: str, dst: str, hop: Message) -> None:
    """The ``move session step`` change, one MULTI: ``hop`` onto ``dst`` and the entry it replaces off ``stream``
    (a step stuck in a lost holder's stream, sent on to the worker that took its stage over)."""
    async with broker.transaction("move session step") as tx:
        tx.pipe.xadd(dst, {MESSAGE_FIELD: encode(hop)})
        tx.pipe.xack(stream, STAGE_GROUP, entry_id)
        tx.pipe.xdel(stream, entry_id)
