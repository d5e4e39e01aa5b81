"""A copy of each session's KV cache in the worker, so a lost page is rebuilt without a replay.

A session step run with ``mirror`` on makes the page return, besides its outputs, the positions the step
added to each of its states (``web/kvcache.js``, names ``MIRROR_PREFIX<step position>+<input name>``).
``Mirrors.keep`` appends them to the worker's copy of the session's cache; the copy is valid for the
step it was last extended by. When the page is lost (its browser died and the worker started a new one,
or the page no longer holds the session), the next step ``n`` of a session whose copy is at step
``n - 1`` is sent with ``restore``: the page takes the copy as the session's cache and runs the step as if
nothing had happened. Nothing is replayed through the other shards; the tokens are the same because the
cache is the same, byte for byte.

The copy lives in the worker process, and what each step adds also goes to Redis in the step's hand-off
(``broker.sessions.read_cache_copy``): a killed worker loses its copy with the page, and the worker that takes
its stage over ``adopt``s the one in Redis (a step sent with ``restore``), so again nothing is replayed.
Copies are dropped at the session's end, after the session TTL unused, and when they stop matching the page
(a step they missed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from broker.messages import StateSlot

log = logging.getLogger(__name__)

MIRROR_PREFIX = "state+"  # web/kvcache.js MIRROR


@dataclass(frozen=True, slots=True)
class MirrorSlot:
    """One state of one step of a page run: its position in the run, its stage's page key, its slot."""

    position: int
    key: str
    slot: StateSlot

    @property
    def wire_name(self) -> str:
        return f"{MIRROR_PREFIX}{self.position}+{self.slot.input_name}"


@dataclass
class Mirror:
    """The cache of one session as of step ``step``: per (page key, input name), its pieces in order."""

    step: int
    pieces: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)
    used_s: float = field(default_factory=time.monotonic)


class Mirrors:
    """The worker's copies of its sessions' caches."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._by_session: dict[str, Mirror] = {}

    def __len__(self) -> int:
        return len(self._by_session)

    def drop(self, session_id: str) -> None:
        self._by_session.pop(session_id, None)

    def sweep(self, now_s: float | None = None) -> int:
        """Drop the copies unused for longer than the TTL; how many."""
        now_s = time.monotonic() if now_s is None else now_s
        stale = [sid for sid, m in self._by_session.items() if now_s - m.used_s > self.ttl_s]
        for sid in stale:
            del self._by_session[sid]
        return len(stale)

    def keep(
        self, session_id: str, step: int, fresh: bool, slots: Sequence[MirrorSlot], outputs: dict[str, np.ndarray]
    ) -> dict[MirrorSlot, np.ndarray]:
        """Take the new positions the page returned (removing them from ``outputs``) into the copy; return
        them (empty when the page sent none or not all: then no copy can follow, here or in Redis)."""
        new = {s: outputs.pop(s.wire_name) for s in slots if s.wire_name in outputs}
        if len(new) != len(slots):  # the page sent none (mirror off) or not all: the copy cannot follow
            self.drop(session_id)
            return {}
        m = self._by_session.get(session_id)
        if fresh:
            m = self._by_session[session_id] = Mirror(step)
        elif m is None or m.step != step - 1:
            self.drop(session_id)
            return new
        for s, piece in new.items():
            m.pieces.setdefault((s.key, s.slot.input_name), []).append(piece)
        m.step, m.used_s = step, time.monotonic()
        return new

    def adopt(
        self, session_id: str, step: int, slots: Sequence[MirrorSlot], pieces: Mapping[str, list[np.ndarray]]
    ) -> bool:
        """Take a copy made elsewhere (Redis, by the stage's previous holder) as this session's copy as of
        ``step``, its pieces by input name; False when it lacks one of ``slots``."""
        if any(s.slot.input_name not in pieces for s in slots):
            return False
        m = self._by_session[session_id] = Mirror(step)
        for s in slots:
            m.pieces[(s.key, s.slot.input_name)] = list(pieces[s.slot.input_name])
        return True

    def restorable(self, session_id: str, step: int, slots: Sequence[MirrorSlot]) -> bool:
        """Whether the copy is exactly the cache the page held before step ``step``, for every slot."""
        m = self._by_session.get(session_id)
        return m is not None and m.step == step - 1 and all((s.key, s.slot.input_name) in m.pieces for s in slots)

    def feeds(self, session_id: str, slots: Sequence[MirrorSlot]) -> Mapping[str, np.ndarray]:
        """The copy as the page takes it back: each state whole, under its wire name."""
        m = self._by_session[session_id]
        out = {}
        for s in slots:
            axis = s.slot.empty_shape.index(0)
            out[s.wire_name] = np.concatenate(m.pieces[(s.key, s.slot.input_name)], axis=axis)
        return out
