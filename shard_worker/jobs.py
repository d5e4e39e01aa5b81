"""The job execution path: one delivery from a stage (or direct) stream, run in the page, handed off.

A job is acked only by the ``hand_off`` script that publishes its output, and only while this worker
still owns it: a job reclaimed by recovery while this worker hung is not published twice. When this
worker also serves the stages right after the job's, they run in the same page op (``chain``) and the
one hand-off past the last of them publishes, acks and records every stage's progress and event. A job
that cannot run here is handed back to its coordinator as a ``ShardFailure`` carrying the failed stage's
inputs (and the failure's ``FailureKind``); the coordinator's recovery policy decides what happens next.
A hand-off retried through a broker outage gives up after ``WorkerSettings.broker_op_deadline_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from broker.clock import now_ms
from broker.keys import STAGE_GROUP
from broker.kinds import FailureKind
from broker.messages import ExecutionEvent, Message, ShardFailure, ShardJob, ShardResult, StageTrace
from broker.retry import retrying
from broker.streams import Delivery

from .bridge import RunResult
from .chain import Link, WorkerMarks, chain_of, page_inputs, steps_of, traces
from .errors import BridgeClosed, BridgeTimeout, PageError, StepFailed, WorkerError
from .host import RunningHost
from .injection import FaultInjection
from .memory import is_out_of_memory
from .stage import Stage

log = logging.getLogger(__name__)

T = TypeVar("T")
Tensors = dict[str, np.ndarray]


class JobHost(RunningHost, Protocol):
    """What the job path needs from its worker."""

    @property
    def faults(self) -> FaultInjection: ...


@dataclass(frozen=True, slots=True)
class Pickup:
    """One delivery being run: the entry, its job, the stages it runs here, and when it was read."""

    d: Delivery
    job: ShardJob
    links: tuple[Link, ...]
    feeds: Tensors
    read_ms: float
    started: float  # perf_counter at the read

    def marks(self, bytes_out: int) -> WorkerMarks:
        return WorkerMarks(
            queue_ms=max(0.0, self.read_ms - self.job.enqueued_ms),
            read_ms=self.read_ms,
            decode_ms=self.d.decode_ms,
            worker_ms=(time.perf_counter() - self.started) * 1000.0,
            handoff_ms=now_ms(),
            bytes_in=sum(a.nbytes for a in self.feeds.values()),
            bytes_out=bytes_out,
        )


class JobRunner:
    """Runs the deliveries of one worker, one at a time."""

    def __init__(self, host: JobHost) -> None:
        self.host = host

    async def process(self, d: Delivery, read_ms: float | None = None) -> None:
        """Run one delivery; ``read_ms`` is when XREADGROUP returned it (default: now)."""
        h = self.host
        read_ms = read_ms or now_ms()
        started = time.perf_counter()
        await h.wait_ready()  # a job read just as the browser was lost runs on the restarted one
        job = d.message
        if not isinstance(job, ShardJob):
            log.error("worker %s: dropping entry %s of %s: %s", h.id, d.entry_id, d.stream, d.error or job)
            await asyncio.shield(
                self._retried(f"ack {d.entry_id}", lambda: h.broker.ack(d.stream, STAGE_GROUP, d.entry_id))
            )
            return
        stage = h.stages.get(job.route[job.stage_index]) if job.stage_index < len(job.route) else None
        if stage is None:
            error = f"worker {h.id} does not serve stage {job.stage_index}"
            await self._fail(d, job, None, FailureKind.UNAVAILABLE, error)
            return
        missing = [n for n in stage.input_names if n not in job.tensors]
        if missing:
            error = f"job lacks tensors {missing} for shard {stage.shard_index}"
            await self._fail(d, job, stage, FailureKind.INPUT, error)
            return
        links = self._loaded(chain_of(job, h.stages, h.settings.fuse_stages))
        p = Pickup(d, job, links, page_inputs(job), read_ms, started)
        result = await self._run(p)
        if result is not None:
            await self._forward(p, result)

    def _loaded(self, links: tuple[Link, ...]) -> tuple[Link, ...]:
        """The job's own stage, and the stages after it whose sessions this page holds (the rest hop on)."""
        loaded = self.host.page.loaded
        return links[:1] + tuple(itertools.takewhile(lambda link: link.key in loaded, links[1:]))

    async def _run(self, p: Pickup) -> RunResult | None:
        """The page's result, or None once the failure is handed back."""
        h, job, first = self.host, p.job, p.links[0]
        faults = [
            h.faults.next_kernel_fault(f"request {job.request_id} shard {k.stage.shard_index}", k.stage.shard_index)
            for k in p.links
        ]
        provider = first.stage.provider_for(first.platform)
        try:
            if first.key not in h.page.loaded:
                await h.page.load(first.key, first.stage, first.platform)
            return await h.page.run_steps(steps_of(p.links, faults), p.feeds)
        except StepFailed as e:
            await self._fail_later_step(p, e)
        except PageError as e:
            shapes = ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in p.feeds.items())
            kind = FailureKind.OUT_OF_MEMORY if is_out_of_memory(str(e)) else FailureKind.KERNEL
            await self._fail(p.d, job, first.stage, kind, f"{e} (inputs {shapes})", provider)
        except BridgeTimeout as e:
            await self._fail(p.d, job, first.stage, FailureKind.TIMEOUT, str(e), provider)
            h.restart_soon(f"kernel timed out: {e}")
        except (BridgeClosed, WorkerError) as e:
            lost = f"{h.settings.browser} lost mid-job: {e}"
            await self._fail(p.d, job, first.stage, FailureKind.BROWSER_LOST, lost, provider)
        return None

    async def _forward(self, p: Pickup, result: RunResult) -> None:
        """Hand the last stage's carried outputs to the next stage, or the result to the coordinator."""
        job, last = p.job, p.links[-1]
        lacking = [n for n in last.stage.carry_names if n not in result.outputs]
        if lacking:
            error = f"shard {last.stage.shard_index} did not produce {lacking}"
            await self._fail(p.d, job, p.links[0].stage, FailureKind.KERNEL, error, p.links[0].platform)
            return
        out: Tensors = {n: result.outputs[n] for n in last.stage.carry_names}
        new = traces(p.links, result.steps, result, p.marks(sum(a.nbytes for a in out.values())), self._base(job))
        trace = (*job.trace, *new)
        dst, msg, final = self._next(job, last.stage_index, out, trace)
        events = [self._event(k.stage, job, k.stage_index, "success", t) for k, t in zip(p.links, new, strict=True)]
        await self._hand_off(p.d, job, dst, msg, events, self._progress(p.links, new), final=final)

    @staticmethod
    def _next(job: ShardJob, index: int, out: Tensors, trace: tuple[StageTrace, ...]) -> tuple[str, Message, bool]:
        """Where stage ``index``'s outputs go, as what: the next stage's job, or the result (``final``)."""
        nxt = index + 1
        if nxt >= len(job.route):
            return job.reply_stream, ShardResult(job.request_id, job.plan_id, out, trace, job.attempt), True
        msg = ShardJob(
            request_id=job.request_id,
            plan_id=job.plan_id,
            stage_index=nxt,
            route=job.route,
            reply_stream=job.reply_stream,
            tensors=out,
            enqueued_ms=now_ms(),
            attempt=1,
            trace=trace,
        )
        return job.route[nxt], msg, False

    async def _fail_later_step(self, p: Pickup, e: StepFailed) -> None:
        """A stage after the job's own failed in the page: the stages before it ran and are traced; the
        failed one is handed back with the inputs it was given, as its own first attempt."""
        h, job = self.host, p.job
        done, failed = p.links[: e.step], p.links[e.step]
        new = traces(done, e.steps, None, p.marks(0), self._base(job))
        platform = failed.stage.provider_for(failed.platform)
        log.warning(
            "worker %s: request %s shard %d failed (%s): %s",
            h.id,
            job.request_id,
            failed.stage.shard_index,
            FailureKind.KERNEL,
            e,
        )
        failure = ShardFailure(
            request_id=job.request_id,
            plan_id=job.plan_id,
            stage_index=failed.stage_index,
            worker_id=h.id,
            attempt=1,
            kind=FailureKind.KERNEL,
            error=str(e),
            trace=(*job.trace, *new),
            tensors=dict(e.tensors),
            route=job.route,
            reply_stream=job.reply_stream,
            platform=platform,
        )
        events = [self._event(k.stage, job, k.stage_index, "success", t) for k, t in zip(done, new, strict=True)]
        events.append(self._event(failed.stage, job, failed.stage_index, "error", self._base(job), platform, str(e)))
        progress = [*self._progress(done, new), (f"s{failed.stage_index}", f"{h.id}:1")]
        await self._hand_off(p.d, job, job.reply_stream, failure, events, progress)

    async def _fail(
        self, d: Delivery, job: ShardJob, stage: Stage | None, kind: FailureKind, error: str, platform: str = ""
    ) -> None:
        """Hand the job back to its coordinator with why it failed; recovery decides what next."""
        h = self.host
        index = stage.shard_index if stage else job.stage_index
        log.warning("worker %s: request %s shard %d failed (%s): %s", h.id, job.request_id, index, kind, error)
        platform = platform or (stage.provider if stage else "")
        failure = ShardFailure(
            request_id=job.request_id,
            plan_id=job.plan_id,
            stage_index=job.stage_index,
            worker_id=h.id,
            attempt=job.attempt,
            kind=kind,
            error=error,
            trace=job.trace,
            tensors=job.tensors,
            route=job.route,
            reply_stream=job.reply_stream,
            platform=platform,
        )
        measured = self._base(job, queue_ms=max(0.0, now_ms() - job.enqueued_ms))
        event = self._event(stage, job, job.stage_index, "error", measured, platform, error)
        progress = [(f"s{job.stage_index}", f"{h.id}:{job.attempt}")]
        await self._hand_off(d, job, job.reply_stream, failure, [event], progress)

    async def _hand_off(
        self,
        d: Delivery,
        job: ShardJob,
        dst: str,
        msg: Message,
        events: Sequence[ExecutionEvent],
        progress: Sequence[tuple[str, str]],
        final: bool = False,
    ) -> None:
        """Publish ``msg`` to ``dst`` and ack ``d`` in one script, only while this worker owns ``d``."""
        h = self.host

        async def op() -> str | None:
            return await h.broker.hand_off(
                d.stream,
                STAGE_GROUP,
                d.entry_id,
                h.id,
                dst,
                msg,
                events=events,
                request_id=job.request_id,
                progress=progress,
                final=final,
            )

        outcome = await asyncio.shield(self._retried(f"hand off request {job.request_id}", op))
        if outcome is None:
            log.warning(
                "worker %s: request %s stage %d was reclaimed while this worker held it; its late result is dropped",
                h.id,
                job.request_id,
                job.stage_index,
            )

    async def _retried(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` retried through a broker outage for at most ``broker_op_deadline_s``."""
        deadline_s = self.host.settings.broker_op_deadline_s
        return await retrying(op, what=f"worker {self.host.id}: {what}", deadline_s=deadline_s)

    def _progress(self, links: Sequence[Link], new: Sequence[StageTrace]) -> list[tuple[str, str]]:
        """The request's progress fields: which worker ran each stage, at which attempt."""
        return [(f"s{k.stage_index}", f"{self.host.id}:{t.attempt}") for k, t in zip(links, new, strict=True)]

    def _base(self, job: ShardJob, queue_ms: float = 0.0) -> StageTrace:
        """A trace of this worker for ``job`` with nothing measured yet."""
        h = self.host
        return StageTrace(
            shard_index=job.stage_index,
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
            attempt=job.attempt,
        )

    def _event(
        self,
        stage: Stage | None,
        job: ShardJob,
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
            request_id=job.request_id,
            plan_id=job.plan_id,
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
