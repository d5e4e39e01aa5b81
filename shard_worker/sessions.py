"""The session path: one step of a generation session, run in the page that keeps its KV cache, handed off.

Session steps arrive on this worker's direct stream (sticky routing: ``SessionStep.route[i]`` names the
worker whose page holds stage ``i``'s cache). The page feeds each stage its held past (an empty one when
the step is ``fresh``), keeps the presents and returns only the other outputs (``web/kvcache.js``). As on
the job path, the entry is acked only by the ``hand_off`` script that publishes the output, while this
worker still owns it; consecutive stages this worker also holds for the session run in the same page op.
A step that cannot run is handed back as a ``SessionFailure``: a page past its session limit refuses a
fresh session (``SessionRefusal.LIMIT``), a page that lost the cache (a restarted browser, an expired
session) says so (``SessionRefusal.MISSING``) and the coordinator replays the session's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.clock import now_ms
from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind
from broker.messages import ExecutionEvent, Message, StageTrace
from broker.retry import poll, retrying
from broker.sessions import SessionEnd, SessionFailure, SessionRefusal, SessionResult, SessionStep, state_entry
from broker.streams import Delivery

from .bridge import RunResult, Step
from .chain import Link, WorkerMarks, traces
from .errors import BridgeClosed, BridgeTimeout, PageError, StepFailed, WorkerError
from .host import RunningHost
from .mirror import Mirrors, MirrorSlot
from .page import Page
from .stage import Stage

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
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


SessionHost = RunningHost  # what the session path needs from its worker


def is_session_entry(d: Delivery) -> bool:
    return isinstance(d.message, SessionStep | SessionEnd)


def refusal_of(error: str) -> tuple[FailureKind, str]:
    """The failure kind and refusal of a page error."""
    if error.startswith(LIMIT_PREFIX):
        return FailureKind.INPUT, SessionRefusal.LIMIT.value
    if error.startswith(MISSING_PREFIX):
        return FailureKind.UNAVAILABLE, SessionRefusal.MISSING.value
    return FailureKind.KERNEL, ""


class SessionRunner:
    """Runs the session steps of one worker, one at a time."""

    def __init__(self, host: SessionHost, settings: SessionSettings | None = None) -> None:
        self.host = host
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
            await asyncio.shield(self._retried("ack", lambda: h.broker.ack(d.stream, STAGE_GROUP, d.entry_id)))
            return
        assert isinstance(msg, SessionStep)
        links = self._links(msg)
        if not links:
            error = f"worker {h.id} does not serve stage {msg.stage_index}"
            await self._fail(d, msg, msg.stage_index, FailureKind.UNAVAILABLE, error)
            return
        ran = await self._run(d, msg, links)
        if ran is not None:
            await self._forward(d, msg, links, ran, read_ms, started)

    def _links(self, msg: SessionStep) -> tuple[Link, ...]:
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

    async def _run(self, d: Delivery, msg: SessionStep, links: tuple[Link, ...]) -> Ran | None:
        h, first = self.host, links[0]
        steps = [
            Step(k.key, k.stage.carry_names, None, tuple(state_entry(s) for s in msg.slots(k.stage_index)))
            for k in links
        ]
        session = {
            "id": msg.session_id,
            "fresh": msg.fresh,
            "limit": self.settings.max_sessions,
            "ttl_ms": self.settings.session_ttl_s * 1000.0,
            "mirror": self.settings.mirror,
        }
        feeds = {n: a.reshape(1) if a.ndim == 0 else a for n, a in msg.tensors.items()}
        slots = mirror_slots(msg, links)
        page = h.page
        try:
            result = await self._page_run(first, steps, feeds, session)
        except (StepFailed, PageError, BridgeTimeout, BridgeClosed, WorkerError) as e:
            if (ran := await self._restore(msg, first, steps, feeds, session, slots, page, e)) is not None:
                return ran
            await self._failed(d, msg, links, e)
            return None
        self.mirrors.keep(msg.session_id, msg.step, msg.fresh, slots, result.outputs)
        return Ran(result)

    async def _page_run(
        self, first: Link, steps: list[Step], feeds: dict[str, np.ndarray], session: dict[str, Any]
    ) -> RunResult:
        page = self.host.page
        if first.key not in page.loaded:
            await page.load(first.key, first.stage, first.platform)
        return await page.run_session(steps, feeds, session)

    async def _restore(
        self,
        msg: SessionStep,
        first: Link,
        steps: list[Step],
        feeds: dict[str, np.ndarray],
        session: dict[str, Any],
        slots: tuple[MirrorSlot, ...],
        page: Page,
        error: Exception,
    ) -> Ran | None:
        """Run the step again on the worker's copy of the cache, when the page lost it and the copy is
        exactly the cache before this step; None when that cannot be done (the caller hands it back)."""
        missing = isinstance(error, PageError) and str(error).startswith(MISSING_PREFIX)
        if isinstance(error, StepFailed) and error.step:
            missing = False  # the stages before it advanced their caches in this page already
        # the browser died under the step (every error here is a WorkerError; the page's own are PageErrors)
        page_lost = isinstance(error, BridgeClosed) or not isinstance(error, PageError | BridgeTimeout)
        if msg.fresh or not (page_lost or missing) or not self.mirrors.restorable(msg.session_id, msg.step, slots):
            return None
        started = time.perf_counter()
        if page_lost and not await self._new_page(page):
            return None
        restore = {**feeds, **self.mirrors.feeds(msg.session_id, slots)}
        try:
            result = await self._page_run(first, steps, restore, {**session, "restore": True})
        except (StepFailed, PageError, BridgeTimeout, BridgeClosed, WorkerError) as e:
            log.warning("worker %s: restoring session %s failed: %s", self.host.id, msg.session_id, e)
            self.mirrors.drop(msg.session_id)
            return None
        self.mirrors.keep(msg.session_id, msg.step, False, slots, result.outputs)
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
        return Ran(result, f"{why}: {error}; cache restored from the worker's copy", ms)

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

    async def _failed(self, d: Delivery, msg: SessionStep, links: tuple[Link, ...], e: Exception) -> None:
        """Hand the step back as the failure ``e`` says."""
        h, first = self.host, links[0]
        self.mirrors.drop(msg.session_id)
        if isinstance(e, StepFailed):
            kind, refusal = refusal_of(str(e))
            await self._fail(d, msg, links[e.step].stage_index, kind, str(e), refusal)
        elif isinstance(e, PageError):
            kind, refusal = refusal_of(str(e))
            await self._fail(d, msg, first.stage_index, kind, str(e), refusal)
        elif isinstance(e, BridgeTimeout):
            await self._fail(d, msg, first.stage_index, FailureKind.TIMEOUT, str(e))
            h.restart_soon(f"session step timed out: {e}")
        else:
            error = f"{h.settings.browser} lost mid-step: {e}"
            await self._fail(d, msg, first.stage_index, FailureKind.BROWSER_LOST, error, SessionRefusal.MISSING.value)

    async def _forward(
        self, d: Delivery, msg: SessionStep, links: tuple[Link, ...], ran: Ran, read_ms: float, started: float
    ) -> None:
        last, result = links[-1], ran.result
        lacking = [n for n in last.stage.carry_names if n not in result.outputs]
        if lacking:
            error = f"shard {last.stage.shard_index} did not produce {lacking}"
            await self._fail(d, msg, last.stage_index, FailureKind.KERNEL, error)
            return
        out: Tensors = {n: result.outputs[n] for n in last.stage.carry_names}
        marks = WorkerMarks(
            queue_ms=max(0.0, read_ms - msg.enqueued_ms),
            read_ms=read_ms,
            decode_ms=d.decode_ms,
            worker_ms=(time.perf_counter() - started) * 1000.0,
            handoff_ms=now_ms(),
            bytes_in=sum(a.nbytes for a in msg.tensors.values()),
            bytes_out=sum(a.nbytes for a in out.values()),
        )
        new = traces(links, result.steps, result, marks, self._base(msg))
        if ran.recovered:  # the first stage's trace says what its worker recovered from before it ran
            new = (dataclasses.replace(new[0], recovered=ran.recovered, recovery_ms=ran.recovery_ms), *new[1:])
        trace = (*msg.trace, *new)
        nxt = last.stage_index + 1
        reply: Message
        if nxt >= len(msg.route):
            dst = msg.reply_stream
            reply = SessionResult(msg.session_id, msg.step, msg.plan_id, out, trace, msg.attempt)  # type: ignore[assignment]
        else:
            dst = msg.route[nxt]
            reply = dataclasses.replace(  # type: ignore[assignment]
                msg, stage_index=nxt, tensors=out, trace=trace, enqueued_ms=now_ms()
            )
        events = [self._event(k.stage, msg, t, "success") for k, t in zip(links, new, strict=True)]
        await self._hand_off(d, msg, dst, reply, events)

    async def _fail(
        self, d: Delivery, msg: SessionStep, stage_index: int, kind: FailureKind, error: str, refusal: str = ""
    ) -> None:
        h = self.host
        log.warning(
            "worker %s: session %s step %d stage %d failed (%s): %s",
            h.id,
            msg.session_id,
            msg.step,
            stage_index,
            kind,
            error,
        )
        failure = SessionFailure(
            msg.session_id, msg.step, msg.plan_id, stage_index, h.id, kind.value, error, refusal, msg.trace, msg.attempt
        )
        stage = self.host.stages.get(msg.stages[stage_index]) if stage_index < len(msg.stages) else None
        base = dataclasses.replace(self._base(msg), shard_index=stage_index)
        await self._hand_off(d, msg, msg.reply_stream, failure, [self._event(stage, msg, base, "error", error)])  # type: ignore[arg-type]

    async def _hand_off(
        self, d: Delivery, msg: SessionStep, dst: str, out: Message, events: list[ExecutionEvent]
    ) -> None:
        """Publish ``out`` to ``dst`` and ack ``d`` in one script, only while this worker owns ``d``."""
        h = self.host

        async def op() -> str | None:
            return await h.broker.hand_off(d.stream, STAGE_GROUP, d.entry_id, h.id, dst, out, events=events)

        if await asyncio.shield(self._retried(f"hand off session {msg.session_id}", op)) is None:
            log.warning(
                "worker %s: session %s step %d was reclaimed while this worker held it; its late result is dropped",
                h.id,
                msg.session_id,
                msg.step,
            )

    async def _retried(self, what: str, op: Any) -> Any:
        deadline_s = self.host.settings.broker_op_deadline_s
        return await retrying(op, what=f"worker {self.host.id}: {what}", deadline_s=deadline_s)

    def _base(self, msg: SessionStep) -> StageTrace:
        h = self.host
        return StageTrace(
            shard_index=msg.stage_index,
            worker_id=h.id,
            browser=h.settings.browser,
            user_agent=h.page.user_agent,
            execution_provider="",
            adapter="",
            kernel_ms=0.0,
            queue_ms=0.0,
            worker_ms=0.0,
            bytes_in=0,
            bytes_out=0,
            attempt=msg.attempt,
        )

    def _event(
        self, stage: Stage | None, msg: SessionStep, t: StageTrace, outcome: str, error: str = ""
    ) -> ExecutionEvent:
        h = self.host
        return ExecutionEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=now_ms(),
            request_id=f"{msg.session_id}#{msg.step}",
            plan_id=msg.plan_id,
            model_name=stage.model_name if stage else "",
            shard_index=t.shard_index,
            shard_type=stage.shard_type if stage else "",
            kind=stage.kind if stage else "",
            dtype=stage.dtype if stage else "",
            worker_id=h.id,
            browser=h.settings.browser,
            platform=t.execution_provider,
            adapter=t.adapter,
            kernel_ms=t.kernel_ms,
            queue_ms=t.queue_ms,
            transfer_ms=t.worker_ms - t.kernel_ms,
            bytes_in=t.bytes_in,
            bytes_out=t.bytes_out,
            attempt=t.attempt,
            outcome=outcome,
            error=error,
        )


def mirror_slots(msg: SessionStep, links: Sequence[Link]) -> tuple[MirrorSlot, ...]:
    """Every state of the step's page run, with its position in the run and its stage's page key."""
    return tuple(MirrorSlot(i, k.key, slot) for i, k in enumerate(links) for slot in msg.slots(k.stage_index))
