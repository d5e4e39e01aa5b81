"""A shard set in the precision each shard runs in: the one asked for, or what ``auto`` chose from calibration.

``apply_precision(shards, request)`` takes the float32 shard set the planner cut and returns it with each shard
lowered (:mod:`coordinator.planning.lowering`), each stage's ``weight_bytes`` the bytes its stored file takes,
the plan's ``precisions`` (so its id names them) and each shard's ``Choice`` (what it runs in and why; with
``auto`` the figures measured for every candidate, :mod:`coordinator.planning.calibration`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from broker.clock import now_ms
from broker.messages import PrecisionEvent
from coordinator.planning.calibration import calibrate, calibration_feeds
from coordinator.planning.lowering import lower_shard, stored_bytes
from coordinator.planning.precision import (
    AUTO,
    FLOAT32,
    Choice,
    Measured,
    Precision,
    PrecisionBound,
    Recipe,
    asked,
    choose,
    runnable,
)
from coordinator.planning.shardset import ShardSet

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PrecisionRequest:
    """What each shard should run in: ``dtype`` for every shard unless ``per_shard`` names it (shard index ->
    dtype); ``platforms`` is each shard's platform (which precisions ``auto`` may try); ``calibration_ids`` the
    token ids ``auto`` calibrates on (None: seeded random inputs)."""

    dtype: str = Precision.FP32.value
    platforms: tuple[str, ...] = ()
    per_shard: Mapping[int, str] = field(default_factory=dict)
    bound: PrecisionBound = PrecisionBound()
    calibration_ids: tuple[int, ...] | None = None

    def dtype_of(self, shard: int) -> str:
        return self.per_shard.get(shard, self.dtype)

    @property
    def lowers(self) -> bool:
        """Whether any shard may run in anything but float32."""
        return any(d != Precision.FP32.value for d in (self.dtype, *self.per_shard.values()))


def apply_precision(shards: ShardSet, request: PrecisionRequest, progress: Progress | None = None) -> ShardSet:
    """``shards`` with every shard in its precision (module docstring); ``shards`` itself when all are fp32."""
    groups = shards.plan.shard_groups
    if not request.lowers:
        return dataclasses.replace(shards, choices=(FLOAT32,) * len(groups))
    choices = _choices(shards, request, progress)
    by_stage = {i: choices[g].recipe for g, members in enumerate(groups) for i in members}
    digests, stages = [], []
    for stage in shards.plan.stages:
        recipe = by_stage[stage.index]
        digest = lower_shard(shards.shard_dir, shards.shard_sha256[stage.index], recipe)
        digests.append(digest)
        weights = stored_bytes(shards.shard_dir, digest) if recipe is not Recipe.FP32 else stage.weight_bytes
        stages.append(dataclasses.replace(stage, weight_bytes=weights))
    plan = dataclasses.replace(
        shards.plan, stages=tuple(stages), precisions=tuple(by_stage[s.index].value for s in stages)
    )
    return ShardSet(plan, shards.profile, tuple(digests), shards.shard_dir, tuple(choices))


def _choices(shards: ShardSet, request: PrecisionRequest, progress: Progress | None) -> list[Choice]:
    groups = shards.plan.shard_groups
    platforms = request.platforms or ("auto",) * len(groups)
    auto = [g for g in range(len(groups)) if request.dtype_of(g) == AUTO]
    measured: dict[int, list[Measured]] = {}
    if auto:
        candidates = [
            [p for p in runnable(platforms[g]) if p is not Precision.FP32] if g in auto else []
            for g in range(len(groups))
        ]
        feeds = calibration_feeds(shards.profile, request.calibration_ids)
        measured = dict(enumerate(calibrate(shards, candidates, feeds, progress, platforms)))
    choices = []
    for g in range(len(groups)):
        if g in auto:
            choices.append(choose(measured[g], request.bound, platforms[g]))
        else:
            choices.append(asked(Precision.parse(request.dtype_of(g)), platforms[g]))
    return choices


def precision_events(shards: ShardSet, model_name: str) -> list[PrecisionEvent]:
    """One event per shard and measured candidate (or per shard, for a precision asked for)."""
    nan, ts, plan = float("nan"), now_ms(), shards.plan.plan_id
    events = []
    for g, choice in enumerate(shards.choices):
        rows = choice.measured or (None,)
        for m in rows:
            events.append(
                PrecisionEvent(
                    event_id=uuid.uuid4().hex,
                    ts_ms=ts,
                    model_name=model_name,
                    plan_id=plan,
                    shard_index=g,
                    dtype=choice.precision.value,
                    measured=m.precision.value if m else "",
                    top1=nan if m is None or m.top1 is None else m.top1,
                    max_diff=m.max_diff if m else nan,
                    relative_diff=m.relative_diff if m else nan,
                    positions=m.positions if m else 0,
                    reason=choice.reason,
                )
            )
    return events
