"""The session path: one step of a generation session, run in the page that keeps its KV cache, handed off.

Session steps are ``StageHop``s with a session, arriving on this worker's direct stream (sticky routing:
``route[i]`` names the worker whose page holds stage ``i``'s cache). The page feeds each stage its held past
(an empty one when the step is ``fresh``), keeps the presents and returns only the other outputs
(``web/kvcache.js``). As on the job path, the entry is acked only by the hand-off that publishes the output
(``stage_runner``), while this worker still owns it; consecutive stages this worker also holds for the
session run in the same page op. A step that cannot run is handed back as a ``StageFailure``: a page past
its session limit refuses a
fresh session (``SessionRefusal.LIMIT``), a page that lost the cache (a restarted browser, an expired
session) says so (``SessionRefusal.MISSING``) and the coordinator replays the session's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.clock import now_ms
from broker.kinds import FailureKind
from broker.messages import StageFault, StageHop
from broker.retry import poll
from broker.sessions import SessionEnd, SessionRefusal, read_cache_copy
from broker.streams import Delivery, MirrorWrite

from .bridge import RunResult, Step
from .chain import Link, WorkerMarks
from .errors import BridgeClosed, BridgeTimeout, PageError, StepFailed, WorkerError
from .host import RunningHost
from .mirror import Mirrors, MirrorSlot
from .page import Page
from .stage_runner import StageRunner

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
MISSING = SessionRefusal.MISSING.value
LIMIT_PREFIX = "session-limit:"  # web/kvcache.js LIMIT
MISSING_PREFIX = "session-missing:"  # web/kvcache.js MISSING
MAX_SESSIONS = 8
SESSION_TTL_S = 600.0
RESTORE_WAIT_S = 60.0  # how long a step whose page was lost waits for the new one before it is handed back
PAGE_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How many sessions one page holds at once, how long an unused one is kept, and whether the worker
    keeps a copy of each session's cache to restore into a new page (``shard_worker.mirror``)."""

    max_sessions: int = MAX_SESSIONS
    session_ttl_s: float = SESSION_TTL_S
    mirror: bool = True
    restore_wait_s: float = RESTORE_WAIT_S

    @classmethod
    def from_env(cls) -> SessionSettings:
        """``XSHARD_MAX_SESSIONS``, ``XSHARD_SESSION_TTL_S`` and ``XSHARD_SESSION_MIRROR`` (0: off)."""
        return cls(
            int(os.environ.get("XSHARD_MAX_SESSIONS", MAX_SESSIONS)),
            float(os.environ.get("XSHARD_SESSION_TTL_S", SESSION_TTL_S)),
            os.environ.get("XSHARD_SESSION_MIRROR", "1") != "0",
        )


@dataclass(frozen=True, slots=True)
class Ran:
    """A page run of a session step, and what it recovered from first (a lost page, restored), if anything."""

    result: RunResult
    recovered: str = ""
    recovery_ms: float = 0.0
    copies: tuple[MirrorWrite, ...] = ()  # what the step adds to the session's cache copies in Redis


SessionHost = RunningHost  # what the session path needs from its worker


@dataclass(frozen=True, slots=True)
class StepRun:
    """One session step at this worker: its hop, its stages here, the page's steps and feeds, the session's
    options for the page, and the cache slots the worker keeps copies of."""

    msg: StageHop
    links: tuple[Link, ...]
    steps: list[Step]
    feeds: dict[str, np.ndarray]
    session: dict[str, Any]
    slots: tuple[MirrorSlot, ...]


def is_session_entry(d: Delivery) -> bool:
    return isinstance(d.message, SessionEnd) or (isinstance(d.message, StageHop) and d.message.is_session)


def refusal_of(error: str) -> tuple[FailureKind, str]:
    """The failure kind and refusal of a page error."""
    if error.startswith(LIMIT_PREFIX):
        return FailureKind.INPUT, SessionRefusal.LIMIT.value
    if error.startswith(MISSING_PREFIX):
        return FailureKind.UNAVAILABLE, SessionRefusal.MISSING.value
    return FailureKind.KERNEL, ""


class SessionRunner(StageRunner):
    """Runs the session steps of one worker, one at a time."""

    def __init__(self, host: SessionHost, settings: SessionSettings | None = None) -> None:
        super().__init__(host)
        self.settings = settings or SessionSettings.from_env()
        self.mirrors = Mirrors(self.settings.session_ttl_s)

    async def process(self, d: Delivery, read_ms: float) -> None:
        h = self.host
        started = time.perf_counter()
        await h.wait_ready()
        msg = d.message
        self.mirrors.sweep()
        if isinstance(msg, SessionEnd):
            self.mirrors.drop(msg.session_id)
            with contextlib.suppress(WorkerError):
                await h.page.end_session(msg.session_id)
            await self.ack(d)
            return
        assert isinstance(msg, StageHop) and msg.is_session
        links = self._links(msg)[:1] if msg.restoring else self._links(msg)  # a restore: its own stage alone
        if not links:
            error = f"worker {h.id} does not serve stage {msg.stage_index}"
            await self.fail(d, msg, StageFault(msg.stage_index, h.id, FailureKind.UNAVAILABLE, error), None)
            return
        ran = await self._run(d, msg, links)
        if ran is not None:
            marks = WorkerMarks(
                queue_ms=max(0.0, read_ms - msg.enqueued_ms),
                read_ms=read_ms,
                decode_ms=d.decode_ms,
                worker_ms=(time.perf_counter() - started) * 1000.0,
                handoff_ms=now_ms(),
                bytes_in=sum(a.nbytes for a in msg.tensors.values()),
                bytes_out=0,
            )
            await self.forward(d, msg, links, ran.result, marks, (ran.recovered, ran.recovery_ms), ran.copies)

    def _links(self, msg: StageHop) -> tuple[Link, ...]:
        """The step's own stage and the stages after it this worker holds for the session too."""
        stages, direct = self.host.stages, msg.route[msg.stage_index]
        links: list[Link] = []
        for index in range(msg.stage_index, len(msg.route)):
            stage = stages.get(msg.stages[index])
            if stage is None or msg.route[index] != direct:
                break
            if links and (not self.host.settings.fuse_stages or stage.session_key(stage.platform) not in self._loaded):
                break
            links.append(Link(index, stage, stage.platform))
        return tuple(links)

    @property
    def _loaded(self) -> Mapping[str, Any]:
        return self.host.page.loaded

    async def _run(self, d: Delivery, msg: StageHop, links: tuple[Link, ...]) -> Ran | None:
        steps = [
            Step(k.key, k.stage.carry_names, None, tuple(s.as_entry() for s in msg.slots(k.stage_index))) for k in links
        ]
        session = {
            "id": msg.session_id,
            "fresh": msg.fresh,
            "limit": self.settings.max_sessions,
            "ttl_ms": self.settings.session_ttl_s * 1000.0,
            "mirror": self.settings.mirror,
        }
        feeds = {n: a.reshape(1) if a.ndim == 0 else a for n, a in msg.tensors.items()}
        run = StepRun(msg, links, steps, feeds, session, mirror_slots(msg, links))
        page = self.host.page
        if msg.restoring:
            return await self._take_over(d, run)
        try:
            result = await self._page_run(links[0], steps, feeds, session)
        except (StepFailed, PageError, BridgeTimeout, BridgeClosed, WorkerError) as e:
            if (ran := await self._restore(run, page, e)) is not None:
                return ran
            await self._failed(d, msg, links, e)
            return None
        return Ran(result, copies=self._copies(run, result))

    async def _take_over(self, d: Delivery, run: StepRun) -> Ran | None:
        """Take the stage over from a lost holder: its cache from the copy in Redis (as of the step before),
        then the step; None once a failure is handed back (no usable copy: the coordinator replays)."""
        h, msg, started = self.host, run.msg, time.perf_counter()
        copy = await self.retried(
            "read the cache copy", lambda: read_cache_copy(h.broker, msg.session_id, msg.stage_index)
        )
        if (
            copy is None
            or copy.step != msg.step - 1
            or not self.mirrors.adopt(msg.session_id, copy.step, run.slots, copy.pieces)
        ):
            held = "none" if copy is None else f"one of step {copy.step}"
            error = f"no copy of stage {msg.stage_index}'s cache at step {msg.step - 1} in Redis ({held})"
            await self.fail(
                d, msg, StageFault(msg.stage_index, h.id, FailureKind.UNAVAILABLE, error, refusal=MISSING), None
            )
            return None
        try:
            result = await self._from_copy(run)
        except (StepFailed, PageError, BridgeTimeout, BridgeClosed, WorkerError) as e:
            await self._failed(d, msg, run.links, e)
            return None
        ms = (time.perf_counter() - started) * 1000.0
        why = f"took stage {msg.stage_index} over; cache restored from its copy in Redis (step {copy.step})"
        log.warning("worker %s: session %s step %d: %s in %.0f ms", h.id, msg.session_id, msg.step, why, ms)
        return Ran(result, why, ms, self._copies(run, result))

    async def _page_run(
        self, first: Link, steps: list[Step], feeds: dict[str, np.ndarray], session: dict[str, Any]
    ) -> RunResult:
        page = self.host.page
        if first.key not in page.loaded:
            await page.load(first.key, first.stage, first.platform)
        return await page.run_session(steps, feeds, session)

    async def _from_copy(self, run: StepRun) -> RunResult:
        """The step on the cache rebuilt from the worker's copy of it (its own, or one adopted from Redis)."""
        feeds = {**run.feeds, **self.mirrors.feeds(run.msg.session_id, run.slots)}
        return await self._page_run(run.links[0], run.steps, feeds, {**run.session, "restore": True})

    def _copies(self, run: StepRun, result: RunResult) -> tuple[MirrorWrite, ...]:
        """Keep the step's new cache pieces (a fresh step's start a new copy; a restored one is never fresh);
        the copies of them for Redis (written in the hand-off)."""
        msg = run.msg
        new = self.mirrors.keep(msg.session_id, msg.step, msg.fresh, run.slots, result.outputs)
        return copies_of(msg, run.links, new)

    async def _restore(self, run: StepRun, page: Page, error: Exception) -> Ran | None:
        """Run the step again on the worker's copy of the cache, when the page lost it and the copy is
        exactly the cache before this step; None when that cannot be done (the caller hands it back)."""
        msg = run.msg
        missing = isinstance(error, PageError) and str(error).startswith(MISSING_PREFIX)
        if isinstance(error, StepFailed) and error.step:
            missing = False  # the stages before it advanced their caches in this page already
        # the browser died under the step (every error here is a WorkerError; the page's own are PageErrors)
        page_lost = isinstance(error, BridgeClosed) or not isinstance(error, PageError | BridgeTimeout)
        restorable = self.mirrors.restorable(msg.session_id, msg.step, run.slots)
        if msg.fresh or not (page_lost or missing) or not restorable:
            return None
        started = time.perf_counter()
        if page_lost and not await self._new_page(page):
            return None
        try:
            result = await self._from_copy(run)
        except (StepFailed, PageError, BridgeTimeout, BridgeClosed, WorkerError) as e:
            log.warning("worker %s: restoring session %s failed: %s", self.host.id, msg.session_id, e)
            self.mirrors.drop(msg.session_id)
            return None
        ms = (time.perf_counter() - started) * 1000.0
        why = "browser lost" if page_lost else "page lost the session"
        log.warning(
            "worker %s: session %s step %d: %s; cache restored from the worker's copy in %.0f ms",
            self.host.id,
            msg.session_id,
            msg.step,
            why,
            ms,
        )
        return Ran(result, f"{why}: {error}; cache restored from the worker's copy", ms, self._copies(run, result))

    async def _new_page(self, old: Page) -> bool:
        """Wait until the worker replaced the lost page ``old`` and is ready again (``restore_wait_s``)."""
        deadline = time.monotonic() + self.settings.restore_wait_s
        async for _ in poll(PAGE_POLL_S, asyncio.Event()):
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(WorkerError):
                if self.host.page is not old and not self.host.page.lost_reason:
                    await asyncio.wait_for(self.host.wait_ready(), max(0.01, deadline - time.monotonic()))
                    return True
        return False

    async def _failed(self, d: Delivery, msg: StageHop, links: tuple[Link, ...], e: Exception) -> None:
        """Hand the step back as the failure ``e`` says."""
        h, first = self.host, links[0]
        self.mirrors.drop(msg.session_id)
        at = links[e.step] if isinstance(e, StepFailed) else first
        given = dict(e.tensors) if isinstance(e, StepFailed) else dict(msg.tensors)  # to go on from that stage
        if isinstance(e, StepFailed | PageError):
            kind, refusal = refusal_of(str(e))
            fault = StageFault(at.stage_index, h.id, kind, str(e), refusal=refusal, tensors=given)
        elif isinstance(e, BridgeTimeout):
            fault = StageFault(at.stage_index, h.id, FailureKind.TIMEOUT, str(e), tensors=given)
            h.restart_soon(f"session step timed out: {e}")
        else:
            kind, why = h.lost_cause()
            error = f"{h.settings.browser} lost mid-step ({why}): {e}"
            fault = StageFault(at.stage_index, h.id, kind, error, refusal=MISSING, tensors=given)
        stage = self.host.stages.get(msg.stages[at.stage_index]) if at.stage_index < len(msg.stages) else None
        await self.fail(d, msg, fault, stage)


def mirror_slots(msg: StageHop, links: Sequence[Link]) -> tuple[MirrorSlot, ...]:
    """Every state of the step's page run, with its position in the run and its stage's page key."""
    return tuple(MirrorSlot(i, k.key, slot) for i, k in enumerate(links) for slot in msg.slots(k.stage_index))


def copies_of(msg: StageHop, links: Sequence[Link], new: Mapping[MirrorSlot, np.ndarray]) -> tuple[MirrorWrite, ...]:
    """The Redis copy writes of a step's new cache positions, one per stage of the run (none without them)."""
    if not new:
        return ()
    by_stage: dict[int, dict[str, np.ndarray]] = {}
    for s, piece in new.items():
        by_stage.setdefault(links[s.position].stage_index, {})[s.slot.input_name] = piece
    return tuple(MirrorWrite(msg.session_id, i, msg.step, msg.fresh, pieces) for i, pieces in by_stage.items())
