"""``xshard demo``: sentence embeddings from all-MiniLM-L6-v2, cut into layer shards across real headless
Chromium and Firefox, checked against native onnxruntime on the whole model.

Every number it prints is measured in this run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from coordinator.cli.console import ProgressPrinter, fail, format_allocation, format_table
from coordinator.cli.demo_generation import demonstrate_generation
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

MODEL = "all-MiniLM-L6-v2"
MAX_TOKENS = 128
LATENCY_REQUESTS = 8
LABEL_CHARS = 30
DEFAULT_SENTENCES = (
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply this morning.",
    "My cat sleeps on the windowsill all afternoon.",
)


def tokenize(tokenizer_path: Path, sentences: Sequence[str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """One padded batch [B, S] (S <= MAX_TOKENS) holding the inputs the model takes."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    encodings = tokenizer.encode_batch(list(sentences))
    batch = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    return {name: batch[name] for name in input_names if name in batch}


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence-transformers pooling: mean over unmasked tokens, then L2-normalize."""
    m = mask.astype(np.float32)[..., np.newaxis]
    pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def run_native(onnx_path: Path, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """The whole, unsharded model in native onnxruntime on the CPU; its outputs and run time in ms
    (session creation not included)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    started = time.perf_counter()
    outputs = session.run(names, dict(inputs))
    run_ms = (time.perf_counter() - started) * 1000.0
    return dict(zip(names, outputs, strict=True)), run_ms


def abbreviate(text: str, chars: int = LABEL_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def format_similarities(sentences: Sequence[str], sims: np.ndarray) -> str:
    headers = ["", "sentence", *[f"[{j + 1}]" for j in range(len(sentences))]]
    rows = [
        [f"[{i + 1}]", abbreviate(s), *[f"{sims[i, j]:.3f}" for j in range(len(sentences))]]
        for i, s in enumerate(sentences)
    ]
    table = format_table(headers, rows)
    nearest = []
    for i, s in enumerate(sentences):
        others = [j for j in range(len(sentences)) if j != i]
        if others:
            j = max(others, key=lambda k: sims[i, k])
            nearest.append(f"  [{i + 1}] {abbreviate(s)!s:<{LABEL_CHARS}}  nearest: [{j + 1}] ({sims[i, j]:.3f})")
    return table + ("\n\n" + "\n".join(nearest) if nearest else "")


def format_timings(metrics: Mapping[str, Any]) -> str:
    components = sorted(metrics["component_results"].values(), key=lambda c: c["shard_index"])
    rows: list[list[Any]] = [
        [
            f"shard {c['shard_index']}",
            f"{c['kernel_ms']:.1f}",
            f"kernel in {c['browser']} ({c['execution_provider']})",
        ]
        for c in components
    ]
    rows.append(["overhead", f"{metrics['overhead_ms']:.1f}", "broker hops, tensor codec, page bridge"])
    rows.append(["end to end", f"{metrics['inference_time_ms']:.1f}", f"request {metrics['request_id']}"])
    return format_table(["", "ms", ""], rows)


def percentile_ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values, dtype=np.float64), q))


async def measure_latency(
    manager: ModelShardingManager, tokenizer_path: Path, sentences: Sequence[str], input_names: Sequence[str]
) -> str | dict[str, list[float]]:
    """LATENCY_REQUESTS single-sentence requests, one after another; their metrics or an error."""
    out: dict[str, list[float]] = {"end_to_end": [], "kernel": [], "overhead": []}
    for k in range(LATENCY_REQUESTS):
        inputs = tokenize(tokenizer_path, [sentences[k % len(sentences)]], input_names)
        r = await manager.run_inference_sharded(inputs)
        if "error" in r:
            return r["error"]
        m = r["metrics"]
        out["end_to_end"].append(m["inference_time_ms"])
        out["kernel"].append(m["kernel_time_ms"])
        out["overhead"].append(m["overhead_ms"])
    return out


async def run_demo(browsers: Sequence[str], shards: int, platform: str, sentences: Sequence[str]) -> int:
    """Run the demo; 0 on success, 1 on failure (with the reason printed)."""
    if not sentences:
        fail("give at least one sentence")
        return 1
    progress = ProgressPrinter()
    names = ", ".join(browsers) if browsers else "the guide's table"
    progress(f"{MODEL}: {shards} layer shards over {names}, platform {platform}")
    manager = ModelShardingManager(
        model_name=MODEL,
        num_shards=shards,
        shard_type="layer",
        model_type="text",
        browsers=list(browsers) or None,
        platform=platform,
        settings=ManagerSettings.from_env(),
        progress=progress,
    )
    try:
        code = await demonstrate(manager, sentences, progress)
    finally:
        progress("closing browsers and broker")
        await manager.close()
    return code or await demonstrate_generation(browsers, platform, progress)


@dataclass(frozen=True, slots=True)
class Comparison:
    """The sharded batch against native onnxruntime on the whole model."""

    embeddings: np.ndarray  # of the sharded outputs
    max_hidden_diff: float  # over the unmasked tokens of last_hidden_state
    max_embedding_diff: float
    unmasked_tokens: int
    native_ms: float


def compare_native(onnx_path: Path, inputs: Mapping[str, np.ndarray], hidden: np.ndarray) -> Comparison:
    mask = inputs["attention_mask"]
    emb = embed(hidden, mask)
    native_outputs, native_ms = run_native(onnx_path, inputs)
    native = native_outputs["last_hidden_state"]
    diff = np.abs(hidden.astype(np.float64) - native.astype(np.float64))[mask.astype(bool)]
    emb_diff = float(np.abs(emb - embed(native, mask)).max())
    return Comparison(emb, float(diff.max()), emb_diff, int(mask.sum()), native_ms)


async def demonstrate(manager: ModelShardingManager, sentences: Sequence[str], progress: ProgressPrinter) -> int:
    if not await manager.initialize_sharding():
        fail(manager.last_error or "initializing the shards failed")
        return 1
    assert manager.model is not None and manager.shards is not None
    if manager.model.tokenizer_path is None:
        fail(f"{manager.model.hf_dir} has no tokenizer.json")
        return 1
    input_names = [s.name for s in manager.shards.profile.inputs]
    inputs = tokenize(manager.model.tokenizer_path, sentences, input_names)
    batch, seq = inputs["input_ids"].shape
    progress(f"ready; embedding {batch} sentences as one [{batch}, {seq}] batch")
    result = await manager.run_inference_sharded(inputs)
    if "error" in result:
        fail(result["error"])
        return 1
    comparison = compare_native(manager.model.onnx_path, inputs, result["result"]["last_hidden_state"])

    progress(f"timing {LATENCY_REQUESTS} single-sentence requests, one after another")
    latency = await measure_latency(manager, manager.model.tokenizer_path, sentences, input_names)
    if isinstance(latency, str):
        fail(latency)
        return 1
    print_report(manager, sentences, (batch, seq), result["metrics"], comparison)
    print_latency(latency)
    return 0


def print_report(
    manager: ModelShardingManager,
    sentences: Sequence[str],
    shape: tuple[int, int],
    metrics: Mapping[str, Any],
    comparison: Comparison,
) -> None:
    """The plan, the similarities, the allocation, the batch's timings and its correctness."""
    assert manager.model is not None and manager.shards is not None
    plan = manager.shards.plan
    cuts = " ".join(f"[{st.start}, {st.end})" for st in plan.stages)
    emb = comparison.embeddings
    print(f"\nmodel: {MODEL} ({manager.model.kind}), ONNX {manager.model.onnx_path}")
    print(f"plan {plan.plan_id}: {len(plan.stages)} layer shards, node ranges {cuts} ({plan.boundary_kind})")
    print("\ncosine similarity (mean-pooled, L2-normalized sentence embeddings)")
    print(format_similarities(sentences, emb @ emb.T))
    print("\nallocation")
    print(format_allocation(manager.get_metrics()["browser_allocation"]))
    print(f"\ntimings of the batch [{shape[0]}, {shape[1]}]")
    print(format_timings(metrics))
    print(
        "\ncorrectness vs native onnxruntime (CPU) on the whole, unsharded model "
        f"(one run of the batch: {comparison.native_ms:.1f} ms)"
    )
    print(
        f"  max |sharded - native| last_hidden_state at {comparison.unmasked_tokens} unmasked tokens: "
        f"{comparison.max_hidden_diff:.2e}"
    )
    print(f"  max |sharded - native| sentence embeddings: {comparison.max_embedding_diff:.2e}")


def print_latency(latency: Mapping[str, Sequence[float]]) -> None:
    e2e, kernel, over = latency["end_to_end"], latency["kernel"], latency["overhead"]
    print(f"\nlatency of {len(e2e)} single-sentence requests, one at a time")
    rows = [
        [label, f"{percentile_ms(values, 50):.1f}", f"{min(values):.1f}", f"{max(values):.1f}"]
        for label, values in (("end to end", e2e), ("kernel (all shards)", kernel), ("overhead", over))
    ]
    print(format_table(["", "p50 ms", "min ms", "max ms"], rows))
