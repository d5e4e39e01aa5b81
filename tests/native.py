"""Native onnxruntime references: the whole model, and a shard set chained in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from coordinator.planning.shardset import ShardSet


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_whole(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, inputs), strict=True))


def run_chain(shards: ShardSet, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    env = dict(inputs)
    for stage in shards.plan.stages:
        sess = _session(shards.path(stage.index))
        feeds = {n: env[n].reshape(1) if env[n].ndim == 0 else env[n] for n in stage.input_names}
        outs = sess.run(list(stage.output_names), feeds)
        env.update(zip(stage.output_names, outs, strict=True))
        env = {n: env[n] for n in stage.carry_names}
    return env


def max_diff_unmasked(got: np.ndarray, want: np.ndarray, mask: np.ndarray | None) -> float:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if mask is not None:
        diff = diff[mask.astype(bool)]
    return float(diff.max())
