"""A model too big for one browser: a LLaMA with TinyLlama-1.1B's shape, ``num_shards="auto"`` across
Chromium and Firefox, one forward pass against transformers.

``python -m benchmarks.big_model [--dir DIR] [--browsers chromium,firefox] [--sequence 8]``

- the model: ``LlamaForCausalLM`` from transformers' own class with TinyLlama-1.1B's config (hidden 2048,
  22 layers, 32 heads, 4 KV heads, intermediate 5632, vocabulary 32000), random weights (seed 0), saved as a
  Hugging Face directory (4.4 GB of fp32) once under ``--dir``;
- the reference: transformers' logits for one random batch, computed in a child process (so its 4.4 GB
  are freed before the browsers start) and saved beside the model;
- the run: ``ModelShardingManager(dir, num_shards="auto", browsers=[...])``: converted to ONNX once (weights
  past 2 GB in external data), cut into the fewest shards whose every shard fits a page, one forward pass;
- generation (``--generation fp32,q8,q4``): the model exported with a KV cache (past 2 GB: external data),
  ``num_shards="auto"`` in each dtype: the pages it takes, decode tokens/s, and the top-1 agreement of one
  teacher-forced prefill with the fp32 run's (targets for q4: at most 2 pages, at least 1 token/s);
- refused: ``num_shards=1`` on the same model, before anything is enqueued, with the sizes in the message;
- printed: the shard count and why, each shard's weights, need and page budget, the conversion and
  initialization times, the forward latency, the largest logit difference (bar: 1e-3), and the peak
  resident memory of every process (this one, the workers, the browsers), sampled every 0.5 s.

Nothing is simulated: real transformers, real onnxruntime-web in real headless browsers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from coordinator.errors import ShardTooLarge
from coordinator.manager import ModelShardingManager
from coordinator.planning.sizing import gb
from coordinator.settings import ManagerSettings

TINYLLAMA_SHAPE = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
VOCAB = 32000
TOLERANCE = 1e-3
SAMPLE_S = 0.5
SCORE_TOKENS = 64
TARGET_Q4_PAGES = 2
TARGET_Q4_TOKENS_PER_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.big_model", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "xshard" / "bench" / "tinyllama-shape")
    p.add_argument("--browsers", default="chromium,firefox")
    p.add_argument("--sequence", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--generation", default="fp32,q8,q4", help="dtypes to generate in (KV cache); '' for none")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--no-forward", action="store_true", help="skip the logits-only forward pass")
    p.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


def make_model(directory: Path) -> float:
    """Save the random TinyLlama-shaped model once; seconds spent (0 when it was there)."""
    if (directory / "config.json").is_file():
        return 0.0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return time.perf_counter() - t0


def batch(sequence: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(1).integers(0, TINYLLAMA_SHAPE["vocab_size"], (1, sequence), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def reference(directory: Path, sequence: int) -> None:
    """transformers' logits for ``batch(sequence)``, saved as ``reference-<seq>.npy`` (child process)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    feeds = batch(sequence)
    with torch.no_grad():
        out = model(torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]))
    np.save(directory / f"reference-{sequence}.npy", out.logits.numpy())


class PeakMemory:
    """Peak RSS of this process and all its descendants, by pid, sampled on a thread."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(SAMPLE_S):
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss, name = proc.memory_info().rss, _describe(proc)
                except psutil.Error:
                    continue
                if rss > self.peaks.get(proc.pid, ("", 0))[1]:
                    self.peaks[proc.pid] = (name, rss)


def _describe(proc: psutil.Process) -> str:
    cmd = proc.cmdline()
    if "shard_worker" in cmd:
        return f"worker ({cmd[cmd.index('--browser') + 1] if '--browser' in cmd else '?'})"
    name = proc.name()
    kind = next((a.split("=", 1)[1] for a in cmd if a.startswith("--type=")), "")
    return f"{name} {kind}".strip() if proc.pid != psutil.Process().pid else "coordinator (this process)"


async def run(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    browsers = [b for b in args.browsers.split(",") if b]
    settings = ManagerSettings.from_env(worker_wait_s=600, assign_timeout_s=1800, request_timeout_s=900)
    manager = ModelShardingManager(
        str(args.dir), num_shards="auto", browsers=browsers, settings=settings, progress=lambda m: print(" ", m)
    )
    try:
        t0 = time.perf_counter()
        shards = await manager.prepare()
        figures["prepare_s"] = time.perf_counter() - t0
        sizing = manager.sizing
        assert sizing is not None
        figures["shards"] = len(shards.plan.stages)
        figures["reason"] = sizing.reason
        figures["shard_sizes"] = [
            {
                "shard": f.shard_index,
                "weights": gb(f.weight_bytes),
                "need": gb(f.need_bytes),
                "budget": gb(f.budget_bytes),
            }
            for f in sizing.fits
        ]
        t1 = time.perf_counter()
        ok = await manager.initialize_sharding()
        figures["initialize_s"] = time.perf_counter() - t1
        if not ok:
            raise SystemExit(f"initialize_sharding failed: {manager.last_error}")
        figures["allocation"] = {
            i: {k: a.get(k) for k in ("browser", "worker_id")} for i, a in manager.allocation.items()
        }
        feeds = batch(args.sequence)
        t2 = time.perf_counter()
        res = await manager.run_inference_sharded(feeds)
        figures["forward_s"] = time.perf_counter() - t2
        if "result" not in res:
            raise SystemExit(f"forward pass failed: {res}")
        logits = np.asarray(res["result"]["logits"])
        want = np.load(args.dir / f"reference-{args.sequence}.npy")
        figures["max_abs_diff"] = float(np.abs(logits - want).max())
        figures["within_tolerance"] = figures["max_abs_diff"] <= TOLERANCE
    finally:
        await manager.close()


async def generate_in(args: argparse.Namespace, dtype: str, reference: np.ndarray | None) -> dict[str, Any]:
    """The model exported with a KV cache, ``num_shards="auto"`` in ``dtype``: how many pages, tokens/s of
    ``--new-tokens`` greedy tokens (EOS off) after a warm-up, and the top-1 agreement of one teacher-forced
    prefill of ``SCORE_TOKENS`` random ids with the fp32 run's (``reference``)."""
    browsers = [b for b in args.browsers.split(",") if b]
    settings = ManagerSettings.from_env(worker_wait_s=600, assign_timeout_s=1800, request_timeout_s=900)
    manager = ModelShardingManager(
        str(args.dir),
        "auto",
        browsers=browsers,
        generation=True,
        dtype=dtype,
        settings=settings,
        progress=lambda m: print(" ", m),
    )
    out: dict[str, Any] = {"dtype": dtype}
    try:
        t0 = time.perf_counter()
        shards = await manager.prepare()
        out["prepare_s"] = time.perf_counter() - t0
        assert manager.sizing is not None
        out["pages"] = len(shards.plan.shard_groups)
        out["reason"] = manager.sizing.reason
        out["shard_weights"] = [gb(s.weight_bytes) for s in shards.plan.stages]
        t1 = time.perf_counter()
        if not await manager.initialize_sharding():
            raise SystemExit(f"initialize_sharding failed ({dtype}): {manager.last_error}")
        out["initialize_s"] = time.perf_counter() - t1
        manager.generation_client().tokenizer.eos_token_id = None
        prompt = [int(t) for t in np.random.default_rng(2).integers(0, VOCAB, 16)]
        await manager.generate(prompt, 2)
        metrics = (await manager.generate(prompt, args.new_tokens))["metrics"]
        out.update({k: metrics[k] for k in ("tokens_per_s", "time_to_first_token_ms")})
        out["kernel_ms_per_token"] = metrics.get("decode_kernel_ms_per_token")
        ids = [int(t) for t in np.random.default_rng(3).integers(0, VOCAB, SCORE_TOKENS)]
        logits = await manager.score(ids)
        out["logits"] = logits
        if reference is not None:
            out["top1_vs_fp32"] = float(np.mean(logits.argmax(-1) == reference.argmax(-1)))
    finally:
        await manager.close()
    return out


async def generation(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    reference = None
    runs = []
    for dtype in [d for d in args.generation.split(",") if d]:
        run_figures = await generate_in(args, dtype, reference)
        logits = run_figures.pop("logits")
        reference = logits if dtype == "fp32" else reference
        runs.append(run_figures)
        print(json.dumps(run_figures, default=str))
    figures["generation"] = runs


async def refuse_one_shard(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """``num_shards=1`` on the model: refused before anything is enqueued (no broker, no browser)."""
    manager = ModelShardingManager(
        str(args.dir), num_shards=1, browsers=["chromium"], settings=ManagerSettings.from_env()
    )
    try:
        await manager.prepare()
        figures["one_shard"] = "accepted (it should not be)"
    except ShardTooLarge as e:
        figures["one_shard"] = f"refused: {e}"
    finally:
        await manager.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reference_only:
        reference(args.dir, args.sequence)
        return 0
    figures: dict[str, Any] = {"shape": TINYLLAMA_SHAPE, "sequence": args.sequence}
    figures["make_model_s"] = make_model(args.dir)
    weights = sum(p.stat().st_size for p in args.dir.glob("*.safetensors"))
    figures["hf_dir_bytes"] = weights
    print(f"model: {args.dir} ({gb(weights)} of safetensors)")
    if not (args.dir / f"reference-{args.sequence}.npy").is_file():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.big_model", "--dir", str(args.dir), "--reference-only"]
        subprocess.run([*cmd, "--sequence", str(args.sequence)], check=True)
        figures["reference_s"] = time.perf_counter() - t0
    with PeakMemory() as peak:
        if not args.no_forward:
            asyncio.run(run(args, figures))
        if args.generation:
            asyncio.run(generation(args, figures))
    asyncio.run(refuse_one_shard(args, figures))
    figures["peak_rss"] = sorted(
        ({"pid": pid, "process": name, "peak": gb(rss)} for pid, (name, rss) in peak.peaks.items()),
        key=lambda r: r["process"],
    )
    print(json.dumps(figures, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    for g in figures.get("generation", []):
        print(
            f"generation in {g['dtype']}: {g['pages']} page(s), {g['tokens_per_s']} tokens/s"
            + (f", top-1 {100 * g['top1_vs_fp32']:.1f} % of fp32's" if "top1_vs_fp32" in g else "")
            + (
                f" (q4 targets: <= {TARGET_Q4_PAGES} pages, >= {TARGET_Q4_TOKENS_PER_S} tokens/s)"
                if g["dtype"] == "q4"
                else ""
            )
        )
    return 0 if figures.get("within_tolerance", args.no_forward) else 1


if __name__ == "__main__":
    sys.exit(main())
