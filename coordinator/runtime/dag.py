"""Running a plan that is a DAG (component sharding): its chains side by side, joined where they meet.

A DAG plan is cut into *segments*: maximal chains of stages in which each stage's only upstream is the
one before it (CLIP with 4 shards: text 0 -> text 1, vision 2, fusion 3). Each segment runs as a
sub-request of its own (``<request id>-s<first stage>``), a ``StageHop`` whose route ends at the
segment's last stage, so the worker of that stage returns its outputs as the sub-request's result. Every
sub-request goes through the ledger, the tracker and recovery exactly as a chain's request does, so a
retry, reroute or redistribution covers every node of the DAG.

Segments with no upstream are submitted at once and run at the same time on their own workers; a
segment whose first stage has upstream (the fusion) is the *join*: it is submitted when every upstream
segment's result is in, with the request's inputs and all those results. The results live in the
ledger (each sub-request's recorded result), so they outlast this coordinator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from broker.messages import DeadLetter, StageResult
from coordinator.planning.cuts import Plan

log = logging.getLogger(__name__)

#: (sub-request id, tensors, first stage index, route up to the segment's last stage) -> its outcome
SubmitSegment = Callable[[str, dict[str, np.ndarray], int, tuple[str, ...]], Awaitable[StageResult | DeadLetter]]


@dataclass(frozen=True, slots=True)
class Segment:
    """Stages ``first .. last`` run as one chain; ``upstream`` are the segments (by first stage) it joins."""

    first: int
    last: int
    upstream: tuple[int, ...]


def segments_of(plan: Plan) -> tuple[Segment, ...]:
    """The plan's chains, in stage order; a stage continues the chain before it when that stage is its
    only upstream and it is that stage's only successor."""
    successors: dict[int, list[int]] = {s.index: [] for s in plan.stages}
    for s in plan.stages:
        for u in s.upstream:
            successors[u].append(s.index)
    first_of: dict[int, int] = {}
    out: list[Segment] = []
    for s in plan.stages:
        continues = len(s.upstream) == 1 and successors[s.upstream[0]] == [s.index] and s.upstream[0] in first_of
        if continues and out and out[-1].last == s.upstream[0]:
            out[-1] = Segment(out[-1].first, s.index, out[-1].upstream)
            first_of[s.index] = out[-1].first
        else:
            ups = tuple(sorted({first_of[u] for u in s.upstream}))
            out.append(Segment(s.index, s.index, ups))
            first_of[s.index] = s.index
    return tuple(out)


class JoinFailed(Exception):
    """A segment of the DAG was dead-lettered; carries its dead letter."""

    def __init__(self, dead: DeadLetter) -> None:
        super().__init__(dead.reason)
        self.dead = dead


async def run_dag(
    plan: Plan,
    route: Sequence[str],
    request_id: str,
    arrays: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    submit: SubmitSegment,
    parallel: bool = True,
) -> StageResult | DeadLetter:
    """Run every segment, each as soon as its upstream segments are done; the merged result (the graph's
    outputs, wherever they were produced, and every stage's trace) or the first dead letter.

    Not ``parallel``: each segment waits for the one before it too (the towers one after another, as
    ``benchmarks/component_dag.py`` compares)."""
    tasks: dict[int, asyncio.Task[StageResult]] = {}

    async def segment(seg: Segment) -> StageResult:
        parts = [await tasks[u] for u in seg.upstream]  # the join: every upstream segment's result
        tensors = dict(arrays)
        for part in parts:
            tensors.update(part.tensors)
        outcome = await submit(f"{request_id}-s{seg.first}", tensors, seg.first, tuple(route[: seg.last + 1]))
        if isinstance(outcome, DeadLetter):
            raise JoinFailed(outcome)
        log.info("request %s: segment %d-%d done", request_id, seg.first, seg.last)
        return outcome

    previous: tuple[int, ...] = ()
    for seg in segments_of(plan):
        if not parallel:
            seg = Segment(seg.first, seg.last, tuple(sorted({*seg.upstream, *previous})))
            previous = (seg.first,)
        tasks[seg.first] = asyncio.get_running_loop().create_task(segment(seg))
    try:
        done = await asyncio.gather(*tasks.values())
    except JoinFailed as e:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return e.dead
    merged = {n: t for r in done for n, t in r.tensors.items() if n in output_names}
    trace = tuple(sorted((t for r in done for t in r.trace), key=lambda t: t.shard_index))
    return StageResult(request_id, plan.plan_id, merged, trace, max(r.attempt for r in done))
