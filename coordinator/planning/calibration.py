"""Measure what a lower precision costs each shard: the adapter that feeds ``precision.choose`` (``dtype="auto"``).

For every shard and every candidate precision, the chain of shards is run in native onnxruntime (CPU) on a
calibration set with that shard alone lowered (:mod:`coordinator.planning.lowering`) and every other shard
float32, and compared with the all-float32 chain:

- the shard's own outputs (what it sends on; never its state): the largest absolute diff, and that diff
  relative to the largest float32 magnitude among them;
- for a model with logits, the share of calibration positions whose next-token argmax is unchanged (every
  position of one prefill: teacher-forced, so one position's flip does not change the next one's input).

Lowering one shard at a time measures each shard's own sensitivity; the chosen precisions then run together.
The calibration set of a causal LM with a tokenizer is ``CALIBRATION_TEXT``; other models get seeded random
inputs of ``CALIBRATION_TOKENS`` positions. Native onnxruntime runs the same quantized operators as the pages'
WASM build (MLAS): what the pages compute is checked against transformers by the tests and benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.model.graph import GraphProfile, TensorSpec
from coordinator.planning.cuts import Stage
from coordinator.planning.lowering import lower_shard
from coordinator.planning.precision import Measured, Precision, recipe_for
from coordinator.planning.shardset import ShardSet

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 128
LOGITS = "logits"
CALIBRATION_TEXT = (
    "The harbour was quiet in the early morning, and the fishing boats rocked gently against the pier. "
    "An old man sat on a wooden crate, mending a net with slow, careful hands, while gulls circled above the "
    "water. In the town behind him the bakery had opened its doors, and the smell of bread drifted down the "
    "narrow streets. Children ran past on their way to school, shouting to one another, and a dog followed "
    "them as far as the corner before it gave up and lay down in the sun. By nine o'clock the first tourists "
    "had arrived. They took photographs of the lighthouse, asked the way to the museum and bought postcards "
    "that showed the harbour in summer, full of sailing boats with white sails. The old man did not look up. "
    "He had seen a great many summers, and he knew that the weather would turn before the week was out."
)

Feeds = dict[str, np.ndarray]
Progress = Callable[[str], None]


def calibration_feeds(profile: GraphProfile, token_ids: Sequence[int] | None = None, seed: int = 0) -> Feeds:
    """One batch of the model's inputs: ``token_ids`` (or seeded random ids) as one row, a mask of ones,
    positions from 0, empty state (past) inputs, standard-normal float inputs; symbolic dims are 1 for the
    batch, 0 for a past, the row's length otherwise."""
    rng = np.random.default_rng(seed)
    length = len(token_ids) if token_ids else CALIBRATION_TOKENS
    state = {p.input_name for p in profile.state_pairs}
    feeds: Feeds = {}
    for spec in profile.inputs:
        shape = tuple(_dim(d, spec.name in state, length) for d in spec.shape)
        feeds[spec.name] = _values(spec, shape, profile.vocab_limits.get(spec.name), token_ids, rng)
    return feeds


def _dim(dim: int | str | None, state: bool, length: int) -> int:
    if isinstance(dim, int) and dim > 0:
        return dim
    name = str(dim or "")
    if "batch" in name:
        return 1
    return 0 if state and "past" in name else length


def _values(
    spec: TensorSpec, shape: tuple[int, ...], vocab: int | None, token_ids: Sequence[int] | None, rng: Any
) -> np.ndarray:
    if not spec.dtype.startswith("int"):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.name == "attention_mask" or (vocab is None and "mask" in spec.name):
        return np.ones(shape, spec.dtype)
    if spec.name == "position_ids":
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
    if vocab is not None:
        if token_ids and shape[-1] == len(token_ids):
            return np.broadcast_to(np.asarray(token_ids), shape).astype(spec.dtype)
        return rng.integers(1, vocab, size=shape).astype(spec.dtype)
    return np.zeros(shape, spec.dtype)


class _Chain:
    """The plan's stages in native onnxruntime, each stage's session made once per shard file."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self._sessions: dict[str, Any] = {}

    def session(self, sha256: str) -> Any:
        if sha256 not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            path = self.shards.shard_dir / f"{sha256}.onnx"
            self._sessions[sha256] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return self._sessions[sha256]

    def run(self, feeds: Feeds, digests: Mapping[int, str]) -> dict[int, Feeds]:
        """Every stage's sent-on outputs (state left out), ``digests`` naming each stage's shard file."""
        env, sent = dict(feeds), {}
        for stage in self.shards.plan.stages:
            names = list(stage.output_names)
            outputs = self.session(digests[stage.index]).run(names, {n: env[n] for n in stage.input_names})
            produced = dict(zip(names, outputs, strict=True))
            env.update(produced)
            sent[stage.index] = {n: produced[n] for n in names if n not in stage.state_output_names}
        return sent


def calibrate(
    shards: ShardSet,
    candidates: Sequence[Sequence[Precision]],
    feeds: Feeds,
    progress: Progress | None = None,
    platforms: Sequence[str] = (),
) -> list[list[Measured]]:
    """For each shard (``plan.shard_groups``), each of its candidate precisions measured (module docstring),
    made by the recipe for the shard's platform (``platforms[g]``, default auto)."""
    say = progress or (lambda message: log.info("%s", message))
    chain = _Chain(shards)
    fp32 = {s.index: shards.shard_sha256[s.index] for s in shards.plan.stages}
    reference = chain.run(feeds, fp32)
    last = shards.plan.stages[-1].index
    positions = int(reference[last][LOGITS].shape[-2]) if LOGITS in reference[last] else _positions(feeds)
    results: list[list[Measured]] = []
    for g, members in enumerate(shards.plan.shard_groups):
        measured = []
        for precision in candidates[g]:
            if precision is Precision.FP32:
                continue
            say(f"calibrating shard {g} in {precision.value} on {positions} positions")
            digests = dict(fp32)
            recipe = recipe_for(precision, platforms[g] if platforms else "auto")
            digests.update({i: lower_shard(shards.shard_dir, fp32[i], recipe) for i in members})
            got = chain.run(feeds, digests)
            measured.append(_compare(precision, [shards.plan.stages[i] for i in members], got, reference, positions))
            log.info("shard %d in %s: %s", g, precision.value, measured[-1].describe())
        results.append(measured)
    return results


def _positions(feeds: Feeds) -> int:
    ids = feeds.get("input_ids")
    return int(ids.shape[-1]) if ids is not None and ids.ndim else 1


def _compare(
    precision: Precision, stages: Sequence[Stage], got: dict[int, Feeds], want: dict[int, Feeds], positions: int
) -> Measured:
    diff, scale = 0.0, 0.0
    for stage in stages:
        for name, expected in want[stage.index].items():
            if expected.dtype.kind != "f" or not expected.size:
                continue
            diff = max(diff, float(np.max(np.abs(got[stage.index][name].astype(np.float64) - expected))))
            scale = max(scale, float(np.max(np.abs(expected))))
    last = max(want)
    top1 = None
    if LOGITS in want[last]:
        top1 = float(np.mean(got[last][LOGITS].argmax(-1) == want[last][LOGITS].argmax(-1)))
    return Measured(precision, top1, diff, diff / scale if scale else 0.0, positions)
