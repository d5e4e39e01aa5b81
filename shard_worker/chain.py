"""Consecutive stages one worker serves, run in one page op with no stream hop between them.

A job for stage ``i`` whose worker also serves stages ``i+1 .. j`` of the same route runs all of them in
its page (``Bridge.run_steps``): the tensors are carried inside the page, and the worker hands off once,
past stage ``j``, with one ``StageTrace`` per stage. The job's entry is still acked only by that one
hand-off, with the ownership check; a later step that fails hands back that stage's own inputs.

What each stage of a chain measured (``Marks``) becomes its trace: the first stage holds the worker's
read and send marks, the last the result and hand-off marks, and each stage its own page marks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from broker.messages import StageHop, StageTrace

from .bridge import RunResult, Step, StepResult
from .stage import Stage

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Link:
    """One stage of a chain: its index in the route, the stage, and the platform it runs on."""

    stage_index: int
    stage: Stage
    platform: str

    @property
    def key(self) -> str:
        return self.stage.session_key(self.platform)


def chain_of(job: StageHop, stages: Mapping[str, Stage], fuse: bool) -> tuple[Link, ...]:
    """The job's own stage (which this worker serves) and, with ``fuse``, every consecutive stage after it
    in the route that this worker serves too. Only the job's own stage takes its ``target_platform``."""
    first = stages[job.route[job.stage_index]]
    links = [Link(job.stage_index, first, job.target_platform or first.platform)]
    for index in range(job.stage_index + 1, len(job.route) if fuse else 0):
        stage = stages.get(job.route[index])
        if stage is None:
            break
        links.append(Link(index, stage, stage.platform))
    return tuple(links)


def page_inputs(job: StageHop) -> Tensors:
    """What the page is sent: every tensor of the job (the chain's stages feed from them and carry some
    past stages that do not use them); scalars as one-element vectors (onnxruntime-web mis-ranks rank-0
    feeds, and shard graphs take them so)."""
    return {n: a.reshape(1) if a.ndim == 0 else a for n, a in job.tensors.items()}


def steps_of(links: Sequence[Link], faults: Sequence[str | None]) -> tuple[Step, ...]:
    """The page steps of a chain: each session keeps its stage's carried tensors for the next."""
    return tuple(Step(link.key, link.stage.carry_names, fail) for link, fail in zip(links, faults, strict=True))


@dataclass(frozen=True, slots=True)
class WorkerMarks:
    """The worker's side of one chain run (epoch ms on its clock, durations in ms)."""

    queue_ms: float
    read_ms: float
    decode_ms: float
    worker_ms: float  # from the job's read to the hand-off, all stages of the chain
    handoff_ms: float
    bytes_in: int
    bytes_out: int


def traces(
    links: Sequence[Link], steps: Sequence[StepResult], run: RunResult | None, w: WorkerMarks, base: StageTrace
) -> tuple[StageTrace, ...]:
    """One trace per stage that ran (``steps[k]`` for ``links[k]``); ``run`` is None when the chain stopped
    at a failed step (then there is no result frame, and no stage is the last one of a completed run).

    ``worker_ms`` of a stage run after another in the page is its own page time; the first stage keeps
    the rest, so the traces add up to the chain's time in the worker."""
    n = len(steps)
    own = [steps[k].read_ms - steps[k - 1].read_ms if k else 0.0 for k in range(n)]
    out = []
    for k, (link, step) in enumerate(zip(links, steps, strict=True)):
        first, last = k == 0, k == n - 1 and run is not None
        out.append(
            dataclasses.replace(
                base,
                shard_index=link.stage.shard_index,
                execution_provider=step.provider,
                adapter=step.adapter,
                kernel_ms=step.kernel_ms,
                queue_ms=w.queue_ms if first else 0.0,
                worker_ms=w.worker_ms - sum(own) if first else own[k],
                bytes_in=w.bytes_in if first else 0,
                bytes_out=w.bytes_out if last else 0,
                read_ms=w.read_ms if first else 0.0,
                decode_ms=w.decode_ms if first else 0.0,
                send_ms=run.send_ms if first and run else 0.0,
                sent_ms=run.sent_ms if first and run else 0.0,
                page_recv_ms=run.page_recv_ms if first and run else 0.0,
                page_fed_ms=step.fed_ms,
                page_ran_ms=step.ran_ms,
                page_read_ms=step.read_ms,
                page_sent_ms=run.page_sent_ms if last and run else 0.0,
                result_ms=run.result_ms if last and run else 0.0,
                handoff_ms=w.handoff_ms if last else 0.0,
                fused=not first,
                attempt=base.attempt if first else 1,
            )
        )
    return tuple(out)
