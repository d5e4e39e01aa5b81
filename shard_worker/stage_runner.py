"""What the job path and the session path share: how a stage's outcome leaves this worker.

Both run a ``StageHop`` (a request's job, or a session's step) in the page and then either forward its
outputs (the next stage's hop, or the result for the reply stream) or hand back a ``StageFailure``. Either
way the entry is acked only by the ``hand_off`` script that publishes the outcome, while this worker still
owns the entry, with the execution events of every stage that ran (and, for a request, its progress in the
request hash). A hand-off retried through a broker outage gives up after ``broker_op_deadline_s``.

``jobs.JobRunner`` and ``sessions.SessionRunner`` keep only what differs: where a hop is read from, how the
page runs it (a job's fused chain; a session's held cache and its restore) and what a failure means there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import numpy as np

from broker.clock import now_ms
from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind
from broker.messages import ExecutionEvent, Message, StageFault, StageHop, StageTrace
from broker.retry import retrying
from broker.streams import Delivery, MirrorWrite

from .bridge import RunResult
from .chain import Link, WorkerMarks, traces
from .host import RunningHost
from .stage import Stage

log = logging.getLogger(__name__)

T = TypeVar("T")
Tensors = dict[str, np.ndarray]


class StageRunner:
    """The hand-off, retry, trace, event and failure of one worker's stage runs."""

    def __init__(self, host: RunningHost) -> None:
        self.host = host

    async def forward(
        self,
        d: Delivery,
        hop: StageHop,
        links: Sequence[Link],
        result: RunResult,
        marks: WorkerMarks,
        recovered: tuple[str, float] = ("", 0.0),
        copies: Sequence[MirrorWrite] = (),
    ) -> None:
        """Hand the last stage's carried outputs to the next stage, or the result to the reply stream;
        ``recovered`` (what and how long) is what the first stage's worker recovered from before it ran,
        ``copies`` what the step adds to a session's cache copies in Redis (written by the same script)."""
        last = links[-1]
        lacking = [n for n in last.stage.carry_names if n not in result.outputs]
        if lacking:
            error = f"shard {last.stage.shard_index} did not produce {lacking}"
            index = last.stage_index if hop.is_session else hop.stage_index
            fault = StageFault(index, self.host.id, FailureKind.KERNEL, error)
            await self.fail(d, hop, fault, links[0].stage)
            return
        out: Tensors = {n: result.outputs[n] for n in last.stage.carry_names}
        marks = dataclasses.replace(marks, bytes_out=sum(a.nbytes for a in out.values()))
        new = traces(links, result.steps, result, marks, self.base(hop))
        if recovered[0]:
            new = (dataclasses.replace(new[0], recovered=recovered[0], recovery_ms=recovered[1]), *new[1:])
        trace = (*hop.trace, *new)
        nxt = last.stage_index + 1
        final = nxt >= len(hop.route)
        msg: Message = hop.result(out, trace) if final else hop.onward(nxt, out, trace, now_ms())
        dst = hop.reply_stream if final else hop.route[nxt]
        events = [self.event(k.stage, hop, k.stage_index, "success", t) for k, t in zip(links, new, strict=True)]
        await self.hand_off(d, hop, dst, msg, events, self.progress(hop, links, new), final=final, copies=copies)

    async def fail(
        self, d: Delivery, hop: StageHop, fault: StageFault, stage: Stage | None, queue_ms: float = 0.0
    ) -> None:
        """Hand ``hop`` back to its reply stream with why stage ``fault.stage_index`` did not run."""
        h = self.host
        log.warning(
            "worker %s: %s stage %d failed (%s): %s", h.id, hop.request_id, fault.stage_index, fault.kind, fault.error
        )
        platform = fault.platform or (stage.provider if stage else "")
        fault = dataclasses.replace(fault, platform=platform)
        measured = dataclasses.replace(self.base(hop, queue_ms), shard_index=fault.stage_index)
        event = self.event(stage, hop, fault.stage_index, "error", measured, platform, fault.error)
        progress = [] if hop.is_session else [(f"s{fault.stage_index}", f"{h.id}:{fault.attempt or hop.attempt}")]
        await self.hand_off(d, hop, hop.reply_stream, hop.failure(fault), [event], progress)

    async def hand_off(
        self,
        d: Delivery,
        hop: StageHop,
        dst: str,
        msg: Message,
        events: Sequence[ExecutionEvent],
        progress: Sequence[tuple[str, str]] = (),
        final: bool = False,
        copies: Sequence[MirrorWrite] = (),
    ) -> None:
        """Publish ``msg`` to ``dst`` and ack ``d`` in one script, only while this worker owns ``d``."""
        h = self.host
        request_id = "" if hop.is_session else hop.request_id  # a session has no request hash

        async def op() -> str | None:
            return await h.broker.hand_off(
                d.stream,
                STAGE_GROUP,
                d.entry_id,
                h.id,
                dst,
                msg,
                events=events,
                request_id=request_id,
                progress=progress,
                final=final,
                mirror=copies,
            )

        if await asyncio.shield(self.retried(f"hand off {hop.request_id}", op)) is None:
            log.warning(
                "worker %s: %s stage %d was reclaimed while this worker held it; its late outcome is dropped",
                h.id,
                hop.request_id,
                hop.stage_index,
            )

    async def ack(self, d: Delivery) -> None:
        """Ack an entry that carries nothing to hand off (undecodable, or a session's end)."""
        h = self.host
        await asyncio.shield(self.retried(f"ack {d.entry_id}", lambda: h.broker.ack(d.stream, STAGE_GROUP, d.entry_id)))

    async def retried(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` retried through a broker outage for at most ``broker_op_deadline_s``."""
        deadline_s = self.host.settings.broker_op_deadline_s
        return await retrying(op, what=f"worker {self.host.id}: {what}", deadline_s=deadline_s)

    def progress(self, hop: StageHop, links: Sequence[Link], new: Sequence[StageTrace]) -> list[tuple[str, str]]:
        """A request's progress fields: which worker ran each stage, at which attempt (a session has none)."""
        if hop.is_session:
            return []
        return [(f"s{k.stage_index}", f"{self.host.id}:{t.attempt}") for k, t in zip(links, new, strict=True)]

    def base(self, hop: StageHop, queue_ms: float = 0.0) -> StageTrace:
        """A trace of this worker for ``hop`` with nothing measured yet."""
        h = self.host
        return StageTrace(
            shard_index=hop.stage_index,
            worker_id=h.id,
            browser=h.settings.browser,
            user_agent=h.page.user_agent,
            execution_provider="",
            adapter="",
            kernel_ms=0.0,
            queue_ms=queue_ms,
            worker_ms=0.0,
            bytes_in=0,
            bytes_out=0,
            attempt=hop.attempt,
        )

    def event(
        self,
        stage: Stage | None,
        hop: StageHop,
        stage_index: int,
        outcome: str,
        t: StageTrace,
        platform: str = "",
        error: str = "",
    ) -> ExecutionEvent:
        h = self.host
        return ExecutionEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=now_ms(),
            request_id=hop.request_id,
            plan_id=hop.plan_id,
            model_name=stage.model_name if stage else "",
            shard_index=stage_index,
            shard_type=stage.shard_type if stage else "",
            kind=stage.kind if stage else "",
            dtype=stage.dtype if stage else "",
            worker_id=h.id,
            browser=h.settings.browser,
            platform=platform or t.execution_provider,
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
