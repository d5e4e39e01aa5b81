"""The plan of a graph: ``plan_shards(profile, num_shards, shard_type) -> Plan``. Pure, no I/O.

"layer" cuts at layer boundaries (:mod:`coordinator.planning.cuts`); "attention_feedforward" and "component"
are :mod:`coordinator.planning.strategies`. Both build on ``cuts``; this module imports them and neither
imports it.
"""

from __future__ import annotations

from coordinator.errors import PlanError
from coordinator.model.graph import GraphProfile
from coordinator.planning.cuts import Plan, build_stages, choose_cuts
from coordinator.planning.strategies import plan_by_strategy

SHARD_TYPES = ("layer", "attention_feedforward", "component")


def plan_shards(profile: GraphProfile, num_shards: int, shard_type: str = "layer", weight_share: float = 0.5) -> Plan:
    """Cut ``profile`` by ``shard_type``: "layer" here, the others in :mod:`coordinator.planning.strategies`."""
    if shard_type not in SHARD_TYPES:
        raise PlanError(f"shard_type must be one of {', '.join(SHARD_TYPES)}, got {shard_type!r}")
    if shard_type != "layer":
        return plan_by_strategy(profile, num_shards, shard_type, weight_share)
    cuts, kind = choose_cuts(profile, num_shards, weight_share)
    bounds = list(zip([0, *cuts], [*cuts, profile.node_count], strict=True))
    return Plan(profile.model_sha256, shard_type, build_stages(profile, bounds, weight_share), kind)
