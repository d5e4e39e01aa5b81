"""A model cut into shard files: plan + content-addressed ONNX files in the shared cache.

By component, the graph's nodes are first reordered so each tower is contiguous (the profile, plan and
shards all see that order; ``plan.model_sha256`` is still the file's).

``cache_dir/shards/<sha256>.onnx`` is what workers on this machine serve to their pages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from coordinator.model.components import order_by_component
from coordinator.model.external import has_external_data, store_external_shard
from coordinator.model.graph import GraphProfile, load_model, profile_graph, shard_model
from coordinator.planning.cuts import Plan
from coordinator.planning.planner import plan_shards
from coordinator.planning.precision import FLOAT32, Choice

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShardSet:
    """The plan, the profile it was cut from and each stage's shard file; ``choices`` is each shard's
    precision and why (``plan.shard_groups`` order; empty: float32 as exported)."""

    plan: Plan
    profile: GraphProfile
    shard_sha256: tuple[str, ...]
    shard_dir: Path
    choices: tuple[Choice, ...] = ()

    def choice_of(self, stage_index: int) -> Choice:
        """The precision of the shard that holds ``stage_index``."""
        return self.choices[self.plan.group_of(stage_index)] if self.choices else FLOAT32

    def path(self, index: int) -> Path:
        return self.shard_dir / f"{self.shard_sha256[index]}.onnx"

    def stage_rows(self) -> list[dict[str, Any]]:
        """Each stage as ``get_metrics()`` shows it: nodes, names, shares, its file's hash and precision."""
        return [
            {
                "index": st.index,
                "nodes": [st.start, st.end],
                "inputs": list(st.input_names),
                "carries": list(st.carry_names),
                "weight_bytes": st.weight_bytes,
                "cost_share": round(st.cost_share, 4),
                "flops_share": round(st.flops_share, 4),
                "sha256": self.shard_sha256[st.index],
                **self.choice_of(st.index).as_dict(),
            }
            for st in self.plan.stages
        ]


def store(shard_dir: Path, data: bytes) -> str:
    """Write ``data`` as ``<sha256>.onnx`` (atomically, once); return the digest."""
    digest = hashlib.sha256(data).hexdigest()
    target = shard_dir / f"{digest}.onnx"
    if not target.is_file():
        shard_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=shard_dir, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return digest


def build_shard_set(
    model_path: Path, num_shards: int, shard_type: str, cache_dir: Path, weight_share: float = 0.5
) -> ShardSet:
    model, sha = load_model(model_path)
    if shard_type == "component":  # each tower's nodes contiguous, so a tower is a node range
        model = order_by_component(model)
    profile = profile_graph(model, sha, Path(model_path).parent)
    plan = plan_shards(profile, num_shards, shard_type, weight_share)
    shard_dir = cache_dir / "shards"
    digests = write_shards(model, profile, plan, shard_dir, Path(model_path).parent)
    return ShardSet(plan, profile, digests, shard_dir)


def write_shards(
    model: onnx.ModelProto, profile: GraphProfile, plan: Plan, shard_dir: Path, base_dir: Path
) -> tuple[str, ...]:
    """Store each stage of ``plan`` as a content-addressed shard; one with external data keeps it outside
    (:mod:`coordinator.model.external`, ``base_dir`` holds the graph's data files)."""
    digests = []
    for stage in plan.stages:
        shard = shard_model(
            model,
            stage.start,
            stage.end,
            stage.input_names,
            stage.output_names,
            profile.dtypes,
            profile.tensor_ranks,
        )
        if has_external_data(shard):
            digests.append(store_external_shard(shard, base_dir, shard_dir))
        else:
            digests.append(store(shard_dir, shard.SerializeToString()))
        log.info(
            "plan %s shard %d: nodes [%d, %d), %d weight bytes, cost share %.2f -> %s",
            plan.plan_id,
            stage.index,
            stage.start,
            stage.end,
            stage.weight_bytes,
            stage.cost_share,
            digests[-1][:12],
        )
    return tuple(digests)
