"""Component sharding as a DAG: a CLIP-shaped model's towers side by side, one after another, and unsharded.

A random ``CLIPModel`` whose text and vision towers cost about the same (same width and depth; 64 tokens
against 64 patches) is converted once and run, in one run, three ways over real headless browsers:

* ``dag``: by component, 3 shards (text on Chromium, vision on Firefox, fusion on Chromium), the towers
  submitted at once and joined at the fusion;
* ``sequential``: the same shards and workers, each segment waiting for the one before it;
* ``unsharded``: the whole model in one Chromium page.

Each way is warmed, then timed over ``--requests`` requests one at a time (end-to-end latency as the
caller sees it). Beside them: each tower's and the fusion's p50 worker time, so the DAG can be read
against max(text, vision) + fusion and the sequential run against their sum. On a machine with few cores
the two towers' browsers compete for them: read the figures beside ``cpus`` and ``loadavg``.

    python -m benchmarks.component_dag [--requests 20] [--json benchmarks/results/component_dag.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import fmt, machine, markdown_table, percentile, write_json
from coordinator.manager import ModelShardingManager
from coordinator.model.export.common import padded_batch
from coordinator.settings import ManagerSettings

WIDTH = 128
LAYERS = 4
TOKENS = 64
IMAGE = 64
PATCH = 8  # 64 patches: the vision tower's sequence is as long as the text's
VOCAB = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.component_dag", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20, help="timed requests per way (default 20)")
    p.add_argument("--batch", type=int, default=4, help="texts and images per request (default 4)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def save_balanced_clip(hf_dir: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_hidden_layers": LAYERS}
    tower["num_attention_heads"] = 4
    text = {**tower, "vocab_size": VOCAB, "max_position_embeddings": TOKENS, "eos_token_id": 2, "bos_token_id": 1}
    vision = {**tower, "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)).eval().save_pretrained(hf_dir)
    return hf_dir


def sample(batch: int, seed: int) -> dict[str, np.ndarray]:
    ids, mask = padded_batch(batch, TOKENS, VOCAB, seed)
    pixels = np.random.default_rng(seed).standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


async def timed(manager: ModelShardingManager, requests: int, batch: int) -> dict[str, Any]:
    """p50/p95 end-to-end latency over ``requests`` sequential requests, and p50 worker ms per shard."""
    for seed in range(3):  # warm: every page has loaded and run its session
        res = await manager.run_inference_sharded(sample(batch, seed))
        if "error" in res:
            raise RuntimeError(res["error"])
    latencies: list[float] = []
    worker_ms: dict[str, list[float]] = {}
    for seed in range(requests):
        started = time.perf_counter()
        res = await manager.run_inference_sharded(sample(batch, 100 + seed))
        latencies.append((time.perf_counter() - started) * 1000.0)
        if "error" in res:
            raise RuntimeError(res["error"])
        for shard, comp in res["metrics"]["component_results"].items():
            worker_ms.setdefault(shard, []).append(comp["worker_ms"])
    return {
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "worker_p50_ms": {k: percentile(v, 50) for k, v in sorted(worker_ms.items())},
    }


async def run_way(hf_dir: Path, cache: Path, way: str, requests: int, batch: int) -> dict[str, Any]:
    component = way != "unsharded"
    manager = ModelShardingManager(
        str(hf_dir),
        num_shards=3 if component else 1,
        shard_type="component" if component else "layer",
        model_type="multimodal",
        browsers=["chromium", "firefox"] if component else ["chromium"],
        platform="wasm",
        settings=ManagerSettings(cache_dir=cache, request_timeout_s=120.0),
    )
    try:
        if not await manager.initialize_sharding():
            raise RuntimeError(f"{way}: initialize_sharding failed: {manager.last_error}")
        if way == "sequential" and manager._client is not None:
            manager._client.dag_parallel = False
        out = await timed(manager, requests, batch)
        if component and manager.shards is not None:
            out["kinds"] = {f"shard_{s.index}": s.kind for s in manager.shards.plan.stages}
        return out
    finally:
        await manager.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xshard-dag-bench-") as temp:
        hf_dir = save_balanced_clip(Path(temp) / "clip")
        cache = Path(temp) / "cache"
        ways = {
            w: await run_way(hf_dir, cache, w, args.requests, args.batch) for w in ("dag", "sequential", "unsharded")
        }
    return {"machine": machine(), "requests": args.requests, "batch": args.batch, "ways": ways}


def report(results: dict[str, Any]) -> str:
    ways = results["ways"]
    kinds = ways["dag"]["kinds"]
    stage = {kinds[k]: v for k, v in ways["dag"]["worker_p50_ms"].items()}
    rows = [[w, fmt(r["p50_ms"]), fmt(r["p95_ms"])] for w, r in ways.items()]
    bound_max = max(stage.get("text", 0.0), stage.get("vision", 0.0)) + stage.get("fusion", 0.0)
    bound_sum = stage.get("text", 0.0) + stage.get("vision", 0.0) + stage.get("fusion", 0.0)
    m = results["machine"]
    return "\n".join(
        [
            markdown_table(["way", "p50 ms", "p95 ms"], rows),
            "",
            "worker p50 ms per shard (dag): " + ", ".join(f"{k} {fmt(v)}" for k, v in stage.items()),
            f"max(text, vision) + fusion = {fmt(bound_max)} ms; text + vision + fusion = {fmt(bound_sum)} ms",
            f"cpus {m.get('cpus')}, loadavg {m.get('loadavg_1m')}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    print(report(results))
    if args.json is not None:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
