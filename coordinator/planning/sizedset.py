"""A shard set sized to the pages: ``num_shards="auto"``, or an explicit count checked against the page budget.

``build_sized_shard_set(model_path, num_shards, ..., budget_bytes)`` cuts the model as ``build_shard_set``
does and returns, beside the shard set, the ``Sizing``: each shard's need against ``budget_bytes`` and the
reason for the count. An explicit count whose shard does not fit is ``ShardTooLarge`` (naming the shard,
its size and the budget) before anything is enqueued (for layer shards, before any shard file is written).
Layer shards to be lowered are sized for their estimated lowered weights; ``precisionset`` then lowers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from coordinator.errors import PlanError
from coordinator.model.graph import load_model, profile_graph
from coordinator.planning.allocation import Slot
from coordinator.planning.lowering import lowered_weight_bytes
from coordinator.planning.planner import plan_shards
from coordinator.planning.precision import Precision
from coordinator.planning.shardset import ShardSet, build_shard_set, write_shards
from coordinator.planning.sizing import MemoryModel, Sizing, auto_plan, check_fit, gb

AUTO = "auto"


def parse_num_shards(value: int | str) -> int | str:
    """``"auto"`` or a count >= 1 (an int or its digits); else ValueError."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"num_shards must be a whole number >= 1 or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"num_shards must be >= 1 or 'auto', got {n}")
    return n


def with_reason(slots: Mapping[int, Slot], reason: str) -> dict[int, Slot]:
    """Each shard's slot with the sizing's reason after its own (what the allocation shows)."""
    return {i: dataclasses.replace(slot, reason=f"{slot.reason}; {reason}") for i, slot in slots.items()}


def build_sized_shard_set(
    model_path: Path,
    num_shards: int | str,
    shard_type: str,
    cache_dir: Path,
    weight_share: float,
    budget_bytes: int,
    memory: MemoryModel | None = None,
    precision: Precision = Precision.FP32,
) -> tuple[ShardSet, Sizing]:
    """The shard set and its sizing (see the module docstring); layer shards are sized for their weights in
    ``precision`` (estimated: ``lowering.lowered_weight_bytes``), others as float32."""
    memory = memory or MemoryModel()
    count = parse_num_shards(num_shards)
    if count != AUTO:
        assert isinstance(count, int)
        if shard_type != "layer":
            shards = build_shard_set(model_path, count, shard_type, cache_dir, weight_share)
            fits = check_fit(shards.profile, shards.plan, budget_bytes, memory)
            return shards, Sizing(shards.plan, fits, budget_bytes, f"{count} shards as asked")
    elif shard_type != "layer":
        raise PlanError(f"num_shards='auto' cuts layer shards; shard_type {shard_type!r} needs a count")
    base = Path(model_path).parent
    model, sha = load_model(model_path)
    profile = profile_graph(model, sha, base)
    if precision is not Precision.FP32:
        weights = lowered_weight_bytes(model, profile.node_weight_bytes, precision)
        profile = dataclasses.replace(profile, node_weight_bytes=tuple(weights))
    if count == AUTO:
        sizing = auto_plan(profile, budget_bytes, memory=memory, weight_share=weight_share)
    else:
        assert isinstance(count, int)
        plan = plan_shards(profile, count, shard_type, weight_share)
        fits = check_fit(profile, plan, budget_bytes, memory)
        largest = max(f.need_bytes for f in fits)
        reason = (
            f"{count} shard{'s' if count != 1 else ''} as asked, the largest needs {gb(largest)} of {gb(budget_bytes)}"
        )
        sizing = Sizing(plan, fits, budget_bytes, reason)
    shard_dir = cache_dir / "shards"
    digests = write_shards(model, profile, sizing.plan, shard_dir, base)
    return ShardSet(sizing.plan, profile, digests, shard_dir), sizing
