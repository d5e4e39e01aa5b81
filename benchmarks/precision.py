"""SmolLM2-135M-Instruct in fp32, q8 and q4 across 4 shards (Chromium and Firefox, WASM), measured in one run.

``python -m benchmarks.precision [--dtypes fp32,q8,q4,auto] [--new-tokens 64] [--positions 200] [--json OUT]``

For each dtype, one manager with 4 layer shards over chromium,firefox:

- decode tokens/s: the median of ``--runs`` greedy sessions of ``--new-tokens`` tokens (EOS off) after a
  warm-up, on random prompt ids; the per-token kernel time beside it;
- top-1 agreement with transformers: ``manager.score`` runs ``EVAL_TEXT`` (not the calibration text) through
  the pages in one teacher-forced prefill, and each of the first ``--positions`` next-token argmaxes is compared
  with transformers' own on the same tokens (float32, the GGUF dequantized); the largest logit diff beside it;
- page memory: the resident memory of the four browsers' process trees once loaded, and the shards' bytes.

Targets (issue 18): q4 decode >= 2x fp32 tokens/s; top-1 agreement >= 98% of fp32's. Nothing is simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.report import fmt, machine, markdown_table, write_json
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.planning.lowering import stored_bytes
from coordinator.settings import ManagerSettings

MODEL = "SmolLM2-135M-Instruct"
TARGET_Q4_SPEEDUP = 2.0
TARGET_TOP1 = 0.98
EVAL_TEXT = (
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide and "
    "water. It takes place mostly in the leaves, inside small structures called chloroplasts, which contain "
    "the green pigment chlorophyll. Chlorophyll absorbs light, above all red and blue light, and uses its "
    "energy to split water molecules. The oxygen that is released goes out into the air through tiny pores "
    "in the leaf, while the hydrogen is used to turn carbon dioxide into sugars. Plants use these sugars for "
    "energy and to build new cells, and they store what they do not need as starch. Almost every living "
    "thing depends on photosynthesis, directly or indirectly: animals eat plants, or eat other animals that "
    "eat plants, and the oxygen we breathe was made by plants and algae over millions of years. Scientists "
    "study the process closely, because a better understanding of it could help farmers grow more food and "
    "could lead to new ways of making clean fuel from sunlight. In a single day, a large tree can take in a "
    "surprising amount of carbon dioxide, and a forest as a whole changes the air of the region around it."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,q8,q4")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--browsers", default="chromium,firefox")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--positions", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def reference_logits(manager: ModelShardingManager, ids: list[int]) -> np.ndarray:
    """transformers' float32 logits at every position of ``ids`` (the model the manager converted)."""
    import torch

    from coordinator.model.convert import load_pretrained

    assert manager.model is not None and manager.model.hf_dir is not None
    model = load_pretrained(manager.model.hf_dir, "causal-lm", manager.model.gguf_file, use_cache=False)
    with torch.no_grad():
        return np.asarray(model(torch.tensor([ids])).logits[0].numpy())


async def browsers_rss_bytes(manager: ModelShardingManager) -> int:
    """Resident memory of every worker's browser, its child processes included."""
    assert manager.broker_url is not None
    total = 0
    async with Broker(manager.broker_url, manager.settings.namespace) as broker:
        for entry in manager.allocation.values():
            info = await broker.worker_info(entry["worker_id"])
            if info is None or not info.browser_pid:
                continue
            try:
                root = psutil.Process(info.browser_pid)
                total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
    return total


async def run_dtype(args: argparse.Namespace, dtype: str, ids: list[int], want: np.ndarray) -> dict[str, Any]:
    browsers = [b for b in args.browsers.split(",") if b]
    settings = ManagerSettings.from_env()
    m = ModelShardingManager(MODEL, args.shards, browsers=browsers, generation=True, dtype=dtype, settings=settings)
    async with m:
        m.generation_client().tokenizer.eos_token_id = None  # every session runs new_tokens long
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(100, 49000, size=args.prompt_tokens)]
        await m.generate(prompt, 4)
        runs = [(await m.generate(prompt, args.new_tokens))["metrics"] for _ in range(args.runs)]
        logits = await m.score(ids)
        rss = await browsers_rss_bytes(m)
        assert m.shards is not None
        shard_bytes = sum(stored_bytes(m.shards.shard_dir, d) for d in m.shards.shard_sha256)
        choices = [c.precision.value for c in m.shards.choices]
        reasons = [c.reason for c in m.shards.choices]
    n = min(args.positions, len(ids) - 1, logits.shape[0])
    got, ref = logits[:n], want[:n]
    return {
        "dtype": dtype,
        "shards": choices,
        "reasons": reasons,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
        "kernel_ms_per_token": statistics.median(r.get("decode_kernel_ms_per_token", 0.0) for r in runs),
        "top1": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
        "max_logit_diff": float(np.max(np.abs(got - ref))),
        "positions": n,
        "browsers_rss_bytes": rss,
        "shard_bytes": shard_bytes,
    }


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "model": MODEL, "runs": []}
    probe = ModelShardingManager(MODEL, args.shards, generation=True, settings=ManagerSettings.from_env())
    await probe.prepare()
    ids = probe.check_generation(EVAL_TEXT, 1)
    want = reference_logits(probe, ids)
    for dtype in [d for d in args.dtypes.split(",") if d]:
        out["runs"].append(await run_dtype(args, dtype, ids, want))
        print(report(out), flush=True)
    out["load_after"] = os.getloadavg()[0]
    return out


def report(out: dict[str, Any]) -> str:
    rows = [
        [
            r["dtype"],
            ",".join(r["shards"]),
            fmt(r["tokens_per_s"]),
            fmt(r["kernel_ms_per_token"]),
            f"{100 * r['top1']:.1f} %",
            fmt(r["max_logit_diff"]),
            f"{r['browsers_rss_bytes'] / 1e9:.2f} GB",
            f"{r['shard_bytes'] / 1e6:.0f} MB",
        ]
        for r in out["runs"]
    ]
    headers = [
        "dtype",
        "shards",
        "decode tokens/s",
        "kernel ms/token",
        "top-1 vs transformers",
        "max logit diff",
        "4 browsers' memory",
        "shard files",
    ]
    lines = [markdown_table(headers, rows)]
    by = {r["dtype"]: r for r in out["runs"]}
    if "fp32" in by and "q4" in by:
        ratio = by["q4"]["tokens_per_s"] / by["fp32"]["tokens_per_s"]
        lines.append(f"q4 / fp32 decode: {fmt(ratio)}x (target >= {TARGET_Q4_SPEEDUP}x)")
    for r in out["runs"]:
        lines.append(
            f"{r['dtype']}: top-1 {100 * r['top1']:.1f} % over {r['positions']} positions "
            f"(target >= {100 * TARGET_TOP1:.0f} %)"
        )
    if "load_after" in out:
        lines.append(f"load average after the run: {out['load_after']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    print(report(out))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
