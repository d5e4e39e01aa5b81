"""A model cut into shard files: plan + content-addressed ONNX files in the shared cache.

``cache_dir/shards/<sha256>.onnx`` is what workers on this machine serve to their pages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coordinator.model.graph import GraphProfile, extract_shard, load_model, profile_graph
from coordinator.planning.planner import Plan, plan_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShardSet:
    plan: Plan
    profile: GraphProfile
    shard_sha256: tuple[str, ...]
    shard_dir: Path

    def path(self, index: int) -> Path:
        return self.shard_dir / f"{self.shard_sha256[index]}.onnx"


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
    profile = profile_graph(model, sha)
    plan = plan_shards(profile, num_shards, shard_type, weight_share)
    shard_dir = cache_dir / "shards"
    digests = []
    for stage in plan.stages:
        data = extract_shard(
            model,
            stage.start,
            stage.end,
            stage.input_names,
            stage.output_names,
            profile.dtypes,
            profile.tensor_ranks,
        )
        digests.append(store(shard_dir, data))
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
    return ShardSet(plan, profile, tuple(digests), shard_dir)
