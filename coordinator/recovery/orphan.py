"""A stage whose every live worker died: which spares to load its shard onto. Pure.

The monitor finds the stage (no live replica after a death), gathers the spares (healthy workers not holding
the shard, breakers applied, in preference order) and asks ``decide_orphan``; it then loads the shard onto
each ``Redistribute`` target in turn until one takes it, and records one recovery event with the plan's
reason. Jobs already queued for the stage wait on its stream and are served once a spare joins it; a request
whose stage failed meanwhile climbs its own ladder (``Policy.decide``).

Rules:

1. A stage with a live replica is not orphaned: nothing to do (``None``).
2. A worker seen dead is never a target, whatever a stale list of spares says.
3. Otherwise every spare is a target, in the order given; with none, the plan has no targets and its reason
   says so (the stage stays uncovered until a worker joins; the recovery event records the failure).

Covering a stage does not depend on the fault-tolerance level: without it even a request that needs no
recovery at all could never finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .decisions import Redistribute


@dataclass(frozen=True, slots=True)
class OrphanPlan:
    """What to do for a stage left without a live worker."""

    stage_index: int
    lost_worker: str  # the dead worker that served it ("" when none is known)
    tries: tuple[Redistribute, ...]  # load the shard onto these, in order, until one takes it
    reason: str  # for the recovery event


def decide_orphan(
    stage_index: int, replicas: Sequence[str], spares: Sequence[str], died: Sequence[str]
) -> OrphanPlan | None:
    """The plan for ``stage_index`` given its live ``replicas``, the ``spares`` that could take its shard and
    the workers that ``died`` while serving it (the first is named as lost); None when the stage is not orphaned."""
    if replicas:
        return None
    lost = died[0] if died else ""
    headline = f"stage {stage_index} lost its only worker {lost}" if lost else f"stage {stage_index} has no worker"
    tries = tuple(Redistribute(w) for w in dict.fromkeys(spares) if w and w not in died)
    reason = headline if tries else f"{headline}; no spare worker to load its shard onto"
    return OrphanPlan(stage_index, lost, tries, reason)


__all__ = ["OrphanPlan", "decide_orphan"]
