"""all-MiniLM-L6-v2 on 1x128 tokens: native onnxruntime, one browser unsharded vs k shards on the same
browser, and pipelined throughput through 3 shards.

``python -m benchmarks.minilm_latency [--browsers chromium,firefox] [--shard-counts 2,3,6] [--requests N]``

- native: onnxruntime ``CPUExecutionProvider`` on the whole converted model (the reference output);
- per browser and execution provider (wasm; webgpu with ``--webgpu``, seconds per inference on software
  adapters): ``num_shards=1`` vs ``num_shards=k`` with ``browsers=[b]`` (one worker, hence one browser
  process, per shard, unless ``--max-connections`` caps them and consecutive shards share a page),
  sequential requests after warm-ups; ratios k shards / unsharded p50 of the e2e time (target <= 1.2x)
  and of the kernel sum (target <= 1.1x); each page gets the cores / the browsers threads;
- pipelined: ``--concurrent`` requests at once through 3 shards on ``--pipeline-browsers``, against
  the same manager's sequential throughput.

Inputs are random valid token ids (``[CLS] ... [SEP]``, ids below the vocabulary size) with a full
attention mask. Managers are started and closed one at a time. Nothing is simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.report import fmt, machine, markdown_table, summarize, write_json
from coordinator.manager import ModelShardingManager
from coordinator.model.resolve import ResolvedModel, resolve_model
from coordinator.settings import ManagerSettings

MODEL = "all-MiniLM-L6-v2"
SEQUENCE = 128
TARGET_RATIO = 1.2
KERNEL_TARGET_RATIO = 1.1
CLS_ID, SEP_ID = 101, 102
WEBGPU_MAX_REQUESTS, WEBGPU_MAX_WARMUP = 3, 1
WAIT_S = 300.0  # for workers to register and to load their shards (a dead worker must not hang the run)
REQUEST_TIMEOUT_S = 120.0
CONFIG_TIMEOUT_S = 420.0  # start + all requests of one config; then it is reported as an error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm_latency", description=__doc__.splitlines()[0])
    p.add_argument("--browsers", default="chromium,firefox", help="comma list (chromium,firefox)")
    p.add_argument("--webgpu", action="store_true", help="also run the webgpu provider (slow on software adapters)")
    p.add_argument("--requests", type=int, default=10, help="measured sequential requests per config (10)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (2)")
    p.add_argument("--concurrent", type=int, default=32, help="pipelined requests in flight at once (32)")
    p.add_argument(
        "--shard-counts", default="3", type=lambda v: [int(x) for x in v.split(",") if x.strip()], help="k (3)"
    )
    p.add_argument("--max-connections", type=int, default=0, help="cap on browsers (0: one per shard)")
    p.add_argument("--pipeline-browsers", default="chromium,firefox,chromium", help="3 shards' browsers")
    p.add_argument("--cache-dir", type=Path, default=None, help="xshard cache (default: ManagerSettings)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def sample_inputs(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(1, SEQUENCE), dtype=np.int64)
    ids[0, 0], ids[0, -1] = CLS_ID, SEP_ID
    return {"input_ids": ids, "attention_mask": np.ones((1, SEQUENCE), dtype=np.int64)}


def vocab_size(model: ResolvedModel) -> int:
    if model.hf_dir is None:
        raise RuntimeError(f"{MODEL} resolved to {model.onnx_path} without its Hugging Face directory")
    return int(json.loads((model.hf_dir / "config.json").read_text())["vocab_size"])


# -- native ------------------------------------------------------------------------------------


def run_native(model: ResolvedModel, inputs: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    reference = session.run(None, inputs)[0]
    for _ in range(args.warmup):
        session.run(None, inputs)
    samples = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        session.run(None, inputs)
        samples.append((time.perf_counter() - t0) * 1000.0)
    return {
        "label": "native onnxruntime",
        "browser": "-",
        "provider": "CPUExecutionProvider",
        "shards": "-",
        "e2e_ms": summarize(samples),
        "reference": reference,
    }


# -- sharded -----------------------------------------------------------------------------------


def new_manager(
    shards: int, browsers: list[str], platform: str, cache_dir: Path | None, max_connections: int = 0
) -> ModelShardingManager:
    settings = ManagerSettings.from_env(
        cache_dir=cache_dir,
        worker_wait_s=WAIT_S,
        assign_timeout_s=WAIT_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    return ModelShardingManager(
        MODEL,
        num_shards=shards,
        browsers=browsers,
        platform=platform,
        settings=settings,
        progress=progress,
        max_connections=max_connections or shards,
    )


async def start(m: ModelShardingManager) -> float:
    t0 = time.perf_counter()
    if not await m.initialize_sharding():
        raise RuntimeError(f"initialize_sharding failed: {m.last_error}")
    return time.perf_counter() - t0


async def infer(m: ModelShardingManager, inputs: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, Any]:
    r = await m.run_inference_sharded(inputs)
    if "error" in r:
        raise RuntimeError(f"request failed: {r['error']}")
    out = next(iter(r["result"].values()))
    return {
        "e2e_ms": float(r["metrics"]["inference_time_ms"]),
        "kernel_ms": float(r["metrics"]["kernel_time_ms"]),
        "max_abs_diff": float(np.abs(out - reference).max()),
    }


async def run_sequential(
    browser: str,
    platform: str,
    shards: int,
    inputs: dict[str, np.ndarray],
    reference: np.ndarray,
    args: argparse.Namespace,
) -> dict[str, Any]:
    n, warmup = args.requests, args.warmup
    if platform == "webgpu":
        n, warmup = min(n, WEBGPU_MAX_REQUESTS), min(warmup, WEBGPU_MAX_WARMUP)
    row: dict[str, Any] = {
        "label": f"{browser} {platform} x{shards}",
        "browser": browser,
        "provider": platform,
        "shards": shards,
    }
    m = new_manager(shards, [browser], platform, args.cache_dir, args.max_connections)
    try:
        async with asyncio.timeout(CONFIG_TIMEOUT_S):
            row["init_s"] = await start(m)
            row["providers_used"] = sorted({a["execution_provider"] for a in m.allocation.values()})
            progress(f"{row['label']}: {warmup} warm-up + {n} sequential requests")
            for _ in range(warmup):
                await infer(m, inputs, reference)
            samples = [await infer(m, inputs, reference) for _ in range(n)]
    except Exception as e:  # one config failing must not stop the others; the manager is closed below
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    finally:
        await m.close()
    row["e2e_ms"] = summarize([s["e2e_ms"] for s in samples])
    row["kernel_ms"] = summarize([s["kernel_ms"] for s in samples])
    row["overhead_ms"] = summarize([s["e2e_ms"] - s["kernel_ms"] for s in samples])
    row["max_abs_diff"] = max(s["max_abs_diff"] for s in samples)
    return row


async def run_pipelined(
    inputs: dict[str, np.ndarray], reference: np.ndarray, args: argparse.Namespace
) -> dict[str, Any]:
    browsers = [b.strip() for b in args.pipeline_browsers.split(",") if b.strip()]
    row: dict[str, Any] = {"browsers": ",".join(browsers), "provider": "wasm", "shards": 3}
    m = new_manager(3, browsers, "wasm", args.cache_dir, args.max_connections)
    try:
        async with asyncio.timeout(CONFIG_TIMEOUT_S):
            row["init_s"] = await start(m)
            for _ in range(args.warmup):
                await infer(m, inputs, reference)
            progress(f"pipelined ({row['browsers']}): {args.requests} sequential, then {args.concurrent} at once")
            t0 = time.perf_counter()
            seq = [await infer(m, inputs, reference) for _ in range(args.requests)]
            seq_wall = time.perf_counter() - t0
            t0 = time.perf_counter()
            conc = await asyncio.gather(*(infer(m, inputs, reference) for _ in range(args.concurrent)))
            conc_wall = time.perf_counter() - t0
    except Exception as e:  # one config failing must not stop the others; the manager is closed below
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    finally:
        await m.close()
    row["sequential"] = {
        "requests": len(seq),
        "wall_s": seq_wall,
        "req_per_s": len(seq) / seq_wall,
        "e2e_ms": summarize([s["e2e_ms"] for s in seq]),
    }
    row["concurrent"] = {
        "requests": len(conc),
        "wall_s": conc_wall,
        "req_per_s": len(conc) / conc_wall,
        "e2e_ms": summarize([s["e2e_ms"] for s in conc]),
    }
    row["speedup"] = row["concurrent"]["req_per_s"] / row["sequential"]["req_per_s"]
    row["max_abs_diff"] = max(s["max_abs_diff"] for s in [*seq, *conc])
    return row


# -- report ------------------------------------------------------------------------------------


def print_report(native: dict[str, Any], rows: list[dict[str, Any]], pipe: dict[str, Any]) -> None:
    print(f"\n## {MODEL}, 1x{SEQUENCE} tokens\n")
    headers = [
        "config",
        "EP used",
        "n",
        "e2e p50 ms",
        "e2e mean ms",
        "kernel p50 ms",
        "overhead p50 ms",
        "max abs diff vs native",
        "init s",
    ]
    table = [
        [
            "native onnxruntime (CPUExecutionProvider)",
            "cpu",
            native["e2e_ms"]["n"],
            fmt(native["e2e_ms"]["p50"]),
            fmt(native["e2e_ms"]["mean"]),
            "-",
            "-",
            "0",
            "-",
        ]
    ]
    for r in rows:
        if "error" in r:
            table.append([r["label"], "-", 0, f"error: {r['error'][:60]}", "", "", "", "", ""])
            continue
        table.append(
            [
                r["label"],
                ",".join(r["providers_used"]),
                r["e2e_ms"]["n"],
                fmt(r["e2e_ms"]["p50"]),
                fmt(r["e2e_ms"]["mean"]),
                fmt(r["kernel_ms"]["p50"]),
                fmt(r["overhead_ms"]["p50"]),
                f"{r['max_abs_diff']:.2e}",
                fmt(r["init_s"], 1),
            ]
        )
    print(markdown_table(headers, table))
    print("\n### k shards on one browser vs unsharded (p50; e2e target <= 1.2x, kernel sum <= 1.1x)\n")
    ratios = []
    by_key = {(r["browser"], r["provider"], r["shards"]): r for r in rows}
    for (browser, provider, shards), s in by_key.items():
        base = by_key.get((browser, provider, 1))
        if shards == 1 or base is None:
            continue
        if "error" in s or "error" in base:
            ratios.append([browser, provider, shards, "-", "-", "n/a", "n/a", "n/a"])
            continue
        ratio = s["e2e_ms"]["p50"] / base["e2e_ms"]["p50"]
        k_ratio = s["kernel_ms"]["p50"] / base["kernel_ms"]["p50"]
        ratios.append(
            [
                browser,
                provider,
                shards,
                fmt(base["e2e_ms"]["p50"]),
                fmt(s["e2e_ms"]["p50"]),
                f"{ratio:.2f}x",
                f"{k_ratio:.2f}x",
                "PASS" if ratio <= TARGET_RATIO and k_ratio <= KERNEL_TARGET_RATIO else "MISS",
            ]
        )
    headers = ["browser", "EP", "k", "unsharded p50 ms", "k shards p50 ms", "e2e ratio", "kernel sum ratio"]
    print(markdown_table([*headers, "verdict"], ratios))
    print("\n### Pipelined throughput, 3 shards, wasm\n")
    if "error" in pipe:
        print(f"{pipe['browsers']}: error: {pipe['error']}")
        return
    table = []
    for mode in ("sequential", "concurrent"):
        p = pipe[mode]
        name = "sequential" if mode == "sequential" else f"{p['requests']} concurrent"
        table.append(
            [
                pipe["browsers"],
                name,
                p["requests"],
                fmt(p["wall_s"], 2),
                fmt(p["req_per_s"], 2),
                fmt(p["e2e_ms"]["p50"]),
                fmt(p["e2e_ms"]["mean"]),
            ]
        )
    print(
        markdown_table(["browsers", "mode", "requests", "wall s", "req/s", "latency p50 ms", "latency mean ms"], table)
    )
    print(
        f"\npipelined / sequential throughput: {pipe['speedup']:.2f}x; "
        f"max abs diff vs native {pipe['max_abs_diff']:.2e}"
    )


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    before = machine()
    cache_dir = args.cache_dir or ManagerSettings.from_env().cache_dir
    progress(f"resolving {MODEL} (cache {cache_dir})")
    model = await asyncio.to_thread(resolve_model, MODEL, cache_dir, progress)
    inputs = sample_inputs(vocab_size(model))
    progress(f"native onnxruntime: {args.warmup} warm-up + {args.requests} runs")
    native = await asyncio.to_thread(run_native, model, inputs, args)
    reference = native.pop("reference")
    browsers = [b.strip() for b in args.browsers.split(",") if b.strip()]
    providers = ["wasm", "webgpu"] if args.webgpu else ["wasm"]
    rows = []
    for browser in browsers:
        for provider in providers:
            for shards in [1, *(k for k in args.shard_counts if k != 1)]:
                rows.append(await run_sequential(browser, provider, shards, inputs, reference, args))
    pipe = await run_pipelined(inputs, reference, args)
    print_report(native, rows, pipe)
    after = machine()
    print(
        f"\nmachine: {before['cpus']} cpus, load average {before['loadavg_1m']} before and "
        f"{after['loadavg_1m']} after (other processes share these cores); code {before['code']}"
    )
    return {
        "benchmark": "minilm_latency",
        "model": MODEL,
        "onnx_path": str(model.onnx_path),
        "sequence": SEQUENCE,
        "requests": args.requests,
        "warmup": args.warmup,
        "target_ratio": TARGET_RATIO,
        "machine_before": before,
        "machine_after": after,
        "native": native,
        "sequential": rows,
        "pipelined": pipe,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
