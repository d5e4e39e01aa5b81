"""The job execution path: one delivery from a stage (or direct) stream, run in the page, handed off.

A job is a ``StageHop`` without a session. It is acked only by the hand-off that publishes its output
(``stage_runner``), while this worker still owns it: a job reclaimed by recovery while this worker hung is
not published twice. When this worker also serves the stages right after the job's, they run in the same
page op (``chain``) and the one hand-off past the last of them publishes, acks and records every stage's
progress and event. A job that cannot run here is handed back as a ``StageFailure`` carrying the failed
stage's inputs (and the failure's ``FailureKind``); the coordinator's recovery policy decides what next.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from broker.clock import now_ms
from broker.kinds import FailureKind
from broker.messages import StageFault, StageHop
from broker.streams import Delivery

from .bridge import RunResult
from .chain import Link, WorkerMarks, chain_of, page_inputs, steps_of, traces
from .errors import BridgeClosed, BridgeTimeout, PageError, StepFailed, WorkerError
from .host import RunningHost
from .injection import FaultInjection
from .memory import is_out_of_memory
from .stage_runner import StageRunner

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
    job: StageHop
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


class JobRunner(StageRunner):
    """Runs the deliveries of one worker, one at a time."""

    def __init__(self, host: JobHost) -> None:
        super().__init__(host)
        self.jobs_host = host

    async def process(self, d: Delivery, read_ms: float | None = None) -> None:
        """Run one delivery; ``read_ms`` is when XREADGROUP returned it (default: now)."""
        h = self.host
        read_ms = read_ms or now_ms()
        started = time.perf_counter()
        await h.wait_ready()  # a job read just as the browser was lost runs on the restarted one
        job = d.message
        if not isinstance(job, StageHop) or job.is_session:
            log.error("worker %s: dropping entry %s of %s: %s", h.id, d.entry_id, d.stream, d.error or job)
            await self.ack(d)
            return
        stage = h.stages.get(job.route[job.stage_index]) if job.stage_index < len(job.route) else None
        if stage is None:
            error = f"worker {h.id} does not serve stage {job.stage_index}"
            await self.fail(d, job, StageFault(job.stage_index, h.id, FailureKind.UNAVAILABLE, error), None)
            return
        missing = [n for n in stage.input_names if n not in job.tensors]
        if missing:
            error = f"job lacks tensors {missing} for shard {stage.shard_index}"
            await self.fail(d, job, StageFault(job.stage_index, h.id, FailureKind.INPUT, error), stage)
            return
        links = self._loaded(chain_of(job, h.stages, h.settings.fuse_stages))
        p = Pickup(d, job, links, page_inputs(job), read_ms, started)
        result = await self._run(p)
        if result is not None:
            await self.forward(d, job, links, result, p.marks(0))

    def _loaded(self, links: tuple[Link, ...]) -> tuple[Link, ...]:
        """The job's own stage, and the stages after it whose sessions this page holds (the rest hop on)."""
        loaded = self.host.page.loaded
        return links[:1] + tuple(itertools.takewhile(lambda link: link.key in loaded, links[1:]))

    async def _run(self, p: Pickup) -> RunResult | None:
        """The page's result, or None once the failure is handed back."""
        h, job, first = self.jobs_host, p.job, p.links[0]
        faults = [
            h.faults.next_kernel_fault(f"request {job.request_id} shard {k.stage.shard_index}", k.stage.shard_index)
            for k in p.links
        ]
        provider = first.stage.provider_for(first.platform)
        queue_ms = max(0.0, now_ms() - job.enqueued_ms)

        def fault(kind: FailureKind, error: str) -> StageFault:
            return StageFault(job.stage_index, h.id, kind, error, provider)

        try:
            if first.key not in h.page.loaded:
                await h.page.load(first.key, first.stage, first.platform)
            return await h.page.run_steps(steps_of(p.links, faults), p.feeds)
        except StepFailed as e:
            await self._fail_later_step(p, e)
        except PageError as e:
            shapes = ", ".join(f"{n}: {a.dtype}{list(a.shape)}" for n, a in p.feeds.items())
            kind = FailureKind.OUT_OF_MEMORY if is_out_of_memory(str(e)) else FailureKind.KERNEL
            await self.fail(p.d, job, fault(kind, f"{e} (inputs {shapes})"), first.stage, queue_ms)
        except BridgeTimeout as e:
            await self.fail(p.d, job, fault(FailureKind.TIMEOUT, str(e)), first.stage, queue_ms)
            h.restart_soon(f"kernel timed out: {e}")
        except (BridgeClosed, WorkerError) as e:
            kind, why = h.lost_cause()
            lost = f"{h.settings.browser} lost mid-job ({why}): {e}"
            await self.fail(p.d, job, fault(kind, lost), first.stage, queue_ms)
        return None

    async def _fail_later_step(self, p: Pickup, e: StepFailed) -> None:
        """A stage after the job's own failed in the page: the stages before it ran and are traced; the
        failed one is handed back with the inputs it was given, as its own first attempt."""
        h, job = self.host, p.job
        done, failed = p.links[: e.step], p.links[e.step]
        new = traces(done, e.steps, None, p.marks(0), self.base(job))
        platform = failed.stage.provider_for(failed.platform)
        log.warning(
            "worker %s: request %s shard %d failed (kernel): %s", h.id, job.request_id, failed.stage.shard_index, e
        )
        trace = (*job.trace, *new)
        fault = StageFault(
            failed.stage_index,
            h.id,
            FailureKind.KERNEL,
            str(e),
            platform,
            attempt=1,
            trace=trace,
            tensors=dict(e.tensors),
        )
        events = [self.event(k.stage, job, k.stage_index, "success", t) for k, t in zip(done, new, strict=True)]
        events.append(self.event(failed.stage, job, failed.stage_index, "error", self.base(job), platform, str(e)))
        progress = [*self.progress(job, done, new), (f"s{failed.stage_index}", f"{h.id}:1")]
        await self.hand_off(p.d, job, job.reply_stream, job.failure(fault), events, progress)
