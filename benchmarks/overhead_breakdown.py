"""Where the time of one request goes, leg by leg, on the real all-MiniLM-L6-v2.

``python -m benchmarks.overhead_breakdown [--sizes 9,128] [--requests N] [--warmup N] [--threads 0]``

A ``ModelShardingManager`` on the embedded valkey-server runs all-MiniLM-L6-v2 in 3 layer shards on
``--browsers`` (Chromium, Firefox, Chromium: one local worker, hence one browser, per shard unless
``--max-connections`` caps them), and the same model unsharded in one Chromium, with sequential
requests of ``--sizes`` tokens (random valid ids, full mask) after warm-ups. Every request is cut
into legs at the instants its parts note:

- the coordinator: the call, ``RequestTracker.submit`` (encode + the accept MULTI with its XADD), the
  reply read (``on_result`` entered: the last hand-off script, the wake-up, XREADGROUP and decode done),
  the ledger's finish MULTI, and the return to the caller; the benchmark notes these around the
  tracker's methods, on the manager it measures;
- each stage's ``StageTrace`` (``broker.messages``): the worker's read (XREADGROUP returned, decoded;
  decoding timed apart), the frame to the page built and written, the page's handler entered, its
  tensors built, ``session.run`` returned, the outputs read, the result frame built, the worker's
  decode of it, and the hand-off script called. A stage run in the same page op as the one before it
  (``fused``) has only its page marks.

Legs between two processes compare two clocks (the worker's ``time.time()``, the page's
``performance.timeOrigin + performance.now()``, both the system clock); their sum per round trip does
not depend on the offset and is printed too. The table shows each leg's p50, p90 and mean, and its
share of the mean end-to-end time (means add up; percentiles do not). The hand-off script alone
(XADD of a message of the same size, XACK, XDEL, event, progress) is timed from this process after
every request, to split "hand-off + wake-up". The load average is sampled with every request. Nothing
is simulated; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.breakdown_legs import Leg, legs_of, print_legs, shares
from benchmarks.report import fmt, machine, markdown_table, summarize, write_json
from broker.keys import STAGE_GROUP
from broker.messages import StageHop, StageResult
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.model.resolve import resolve_model
from coordinator.settings import ManagerSettings

MODEL = "all-MiniLM-L6-v2"
CLS_ID, SEP_ID, VOCAB = 101, 102, 30522
WAIT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
CONFIG_TIMEOUT_S = 600.0
SHORT_TARGET_SHARE, SHORT_TARGET_RATIO, LONG_TARGET_RATIO = 0.25, 1.5, 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead_breakdown", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="9,128", help="tokens per request, comma list (9,128)")
    p.add_argument("--requests", type=int, default=20, help="measured sequential requests per config (20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests first (3)")
    p.add_argument("--browsers", default="chromium,firefox,chromium", help="the sharded run's browsers")
    p.add_argument("--shards", type=int, default=3, help="layer shards (3)")
    p.add_argument("--baseline", default="chromium", help="the unsharded run's browser ('' to skip)")
    p.add_argument("--threads", default="", help="comma list of wasm threads per page to compare (''; 0 = auto)")
    p.add_argument("--max-connections", default="", help="comma list of caps on browsers to compare (''; 0: default)")
    p.add_argument("--cache-dir", type=Path, default=None, help="xshard cache (default: ManagerSettings)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def now_ms() -> float:
    return time.time() * 1000.0


def sample_inputs(tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, VOCAB, size=(1, tokens), dtype=np.int64)
    ids[0, 0], ids[0, -1] = CLS_ID, SEP_ID
    return {"input_ids": ids, "attention_mask": np.ones((1, tokens), dtype=np.int64)}


# -- the coordinator's marks -------------------------------------------------------------------------


class CoordinatorMarks:
    """Notes when the manager's tracker accepts a request and reads its result, by request id."""

    def __init__(self, m: ModelShardingManager) -> None:
        tracker = m.tracker
        if tracker is None:
            raise RuntimeError("the manager is not initialized")
        self.marks: dict[str, dict[str, Any]] = {}
        submit, on_result = tracker.submit, tracker.on_result

        async def timed_submit(job: StageHop) -> Any:
            t0 = now_ms()
            fut = await submit(job)
            self.marks[job.request_id] = {"submit": t0, "accepted": now_ms()}
            return fut

        async def timed_on_result(msg: StageResult, entry: Any) -> None:
            t0 = now_ms()
            await on_result(msg, entry)
            self.marks.setdefault(msg.request_id, {}).update(read=t0, finished=now_ms(), result=msg)

        tracker.submit = timed_submit  # type: ignore[method-assign]
        tracker.on_result = timed_on_result  # type: ignore[method-assign]


class HandOffProbe:
    """The hand-off script alone, from this process: a pending entry of ``job``'s size handed on."""

    def __init__(self, url: str) -> None:
        self.broker = Broker(url, f"hoprobe{uuid.uuid4().hex[:8]}")
        self.src, self.dst = self.broker.keys.stage("probe", 0), self.broker.keys.stage("probe", 1)

    async def sample(self, job: StageHop) -> float:
        await self.broker.ensure_group(self.src, STAGE_GROUP)
        await self.broker.add(self.src, job)
        [d] = await self.broker.read_group(STAGE_GROUP, "probe", [self.src], count=1, block_ms=1000)
        t0 = time.perf_counter()
        await self.broker.hand_off(d.stream, STAGE_GROUP, d.entry_id, "probe", self.dst, job, events=[job])
        ms = (time.perf_counter() - t0) * 1000.0
        await self.broker.delete(self.dst)
        return ms

    async def close(self) -> None:
        await self.broker.delete(self.src, self.dst, self.broker.keys.events)
        await self.broker.close()


# -- configurations, run side by side ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    label: str
    shards: int
    browsers: tuple[str, ...]
    threads: str  # wasm threads per page ('' or '0': the manager's policy, the cores / the browsers)
    max_connections: int  # 0: the manager's default


class Running:
    """One configuration's manager, started, and the samples of its requests."""

    def __init__(self, config: Config, tokens: int, args: argparse.Namespace) -> None:
        self.config, self.tokens = config, tokens
        self.inputs = sample_inputs(tokens)
        settings = ManagerSettings.from_env(
            cache_dir=args.cache_dir,
            worker_wait_s=WAIT_S,
            assign_timeout_s=WAIT_S,
            request_timeout_s=REQUEST_TIMEOUT_S,
            wasm_threads=int(config.threads) if config.threads else None,
        )
        extra: dict[str, Any] = {"max_connections": config.max_connections} if config.max_connections else {}
        self.m = ModelShardingManager(
            MODEL,
            num_shards=config.shards,
            browsers=list(config.browsers),
            platform="wasm",
            settings=settings,
            progress=progress,
            **extra,
        )
        self.samples: list[dict[str, Any]] = []
        self.error = ""
        self.allocation: dict[int, dict[str, Any]] = {}
        self._marks: CoordinatorMarks | None = None
        self._probe: HandOffProbe | None = None

    async def start(self) -> None:
        try:
            async with asyncio.timeout(CONFIG_TIMEOUT_S):
                if not await self.m.initialize_sharding():
                    raise RuntimeError(f"initialize_sharding failed: {self.m.last_error}")
        except Exception as e:  # one config failing must not stop the others
            self.error = f"{type(e).__name__}: {e}"
            return
        self.allocation = {i: {k: v for k, v in a.items() if k != "reason"} for i, a in self.m.allocation.items()}
        self._marks, self._probe = CoordinatorMarks(self.m), HandOffProbe(str(self.m.broker_url))

    async def request(self, measured: bool) -> None:
        if self.error or self._marks is None or self._probe is None:
            return
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                sample = await one_request(self.m, self._marks, self._probe, self.inputs)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            return
        if measured:
            self.samples.append(sample)

    async def close(self) -> None:
        if self._probe is not None:
            await self._probe.close()
        await self.m.close()

    def row(self) -> dict[str, Any]:
        c = self.config
        row: dict[str, Any] = {
            "label": c.label,
            "shards": c.shards,
            "browsers": list(c.browsers),
            "tokens": self.tokens,
            "threads": c.threads,
            "allocation": self.allocation,
        }
        if self.error or not self.samples:
            return {**row, "error": self.error or "no samples"}
        return {**row, **figures(self.samples)}


async def one_request(
    m: ModelShardingManager, marks: CoordinatorMarks, probe: HandOffProbe, inputs: dict[str, np.ndarray]
) -> dict[str, Any]:
    load = os.getloadavg()[0]
    t_call = now_ms()
    r = await m.run_inference_sharded(inputs)
    t_return = now_ms()
    if "error" in r:
        raise RuntimeError(f"request failed: {r['error']}")
    c = marks.marks.pop(r["metrics"]["request_id"])
    result: StageResult = c["result"]
    legs = legs_of(t_call, c, result.trace, t_return)
    job = StageHop("probe", "probe", 1, ("a", "b"), "r", dict(result.tensors), now_ms())
    return {
        "e2e_ms": t_return - t_call,
        "kernel_ms": sum(t.kernel_ms for t in result.trace),
        "legs": legs,
        "handoff_script_ms": await probe.sample(job),
        "load_1m": load,
        "fused": sum(t.fused for t in result.trace),
    }


async def run_side_by_side(configs: list[Config], tokens: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start every configuration, then send their requests in turns, so each sees the same load."""
    running = [Running(c, tokens, args) for c in configs]
    try:
        for r in running:
            await r.start()
        progress(f"{tokens} tokens: {args.warmup} warm-up + {args.requests} requests per config, in turns")
        for i in range(args.warmup + args.requests):
            for r in running[i % len(running) :] + running[: i % len(running)]:
                await r.request(measured=i >= args.warmup)
    finally:
        for r in running:
            await r.close()
    return [r.row() for r in running]


def figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    e2e = summarize([s["e2e_ms"] for s in samples])
    kernel = summarize([s["kernel_ms"] for s in samples])
    names = list(dict.fromkeys(leg.name for s in samples for leg in s["legs"]))
    legs = {n: summarize([leg.ms for s in samples for leg in s["legs"] if leg.name == n]) for n in names}
    kinds = {leg.name: leg.kind for s in samples for leg in s["legs"]}
    return {
        "e2e_ms": e2e,
        "kernel_ms": kernel,
        "non_kernel_share_p50": (e2e["p50"] - kernel["p50"]) / e2e["p50"],
        "legs_ms": legs,
        "leg_kinds": kinds,
        "handoff_script_ms": summarize([s["handoff_script_ms"] for s in samples]),
        "load_1m": summarize([s["load_1m"] for s in samples]),
        "fused_stages": max(s["fused"] for s in samples),
    }


# -- report -----------------------------------------------------------------------------------------


def print_config(r: dict[str, Any]) -> None:
    print(f"\n### {r['label']}, 1x{r['tokens']} tokens\n")
    if "error" in r:
        print(f"error: {r['error']}")
        return
    threads = sorted({str(a.get("wasm_threads", "?")) for a in r["allocation"].values()})
    print(
        f"browsers {', '.join(r['browsers'])}; workers {len({a['worker_id'] for a in r['allocation'].values()})}; "
        f"wasm threads per page {'/'.join(threads)}; fused stages {r['fused_stages']}; "
        f"load average p50 {fmt(r['load_1m']['p50'])} (max {fmt(r['load_1m']['max'])})"
    )
    legs = [Leg(name, r["leg_kinds"][name], 0.0) for name in r["legs_ms"]]
    print_legs(legs, r["legs_ms"], r["e2e_ms"])
    by_kind = shares(legs, r["legs_ms"], r["e2e_ms"])
    print("\nby kind (means, share of the e2e mean): " + "; ".join(f"{k} {fmt(v * 100, 1)}%" for k, v in by_kind))
    print(
        f"e2e p50 {fmt(r['e2e_ms']['p50'])} ms, kernel sum p50 {fmt(r['kernel_ms']['p50'])} ms, non-kernel share "
        f"of e2e p50 {fmt(r['non_kernel_share_p50'] * 100, 1)}%; hand-off script alone (this process) p50 "
        f"{fmt(r['handoff_script_ms']['p50'], 3)} ms"
    )


def print_targets(rows: list[dict[str, Any]]) -> None:
    print("\n### Targets (p50, this run; each sharded run against the unsharded one with the same threads)\n")
    table = []
    ok = [r for r in rows if "error" not in r]
    for s in (r for r in ok if r["shards"] > 1):
        tokens = s["tokens"]
        base = next((r for r in ok if r["shards"] == 1 and (r["tokens"], r["threads"]) == (tokens, s["threads"])), None)
        if tokens < 64:
            share = f"{fmt(s['non_kernel_share_p50'] * 100, 1)}%"
            table.append([s["label"], tokens, "non-kernel share of e2e", share, f"<= {SHORT_TARGET_SHARE:.0%}"])
        if base is not None:
            ratio = s["e2e_ms"]["p50"] / base["e2e_ms"]["p50"]
            target = SHORT_TARGET_RATIO if tokens < 64 else LONG_TARGET_RATIO
            table.append([s["label"], tokens, f"e2e / {base['label']}", f"{ratio:.2f}x", f"<= {target}x"])
            k_ratio = s["kernel_ms"]["p50"] / base["kernel_ms"]["p50"]
            table.append([s["label"], tokens, "kernel sum / unsharded kernel", f"{k_ratio:.2f}x", "<= 1.1x"])
    print(markdown_table(["config", "tokens", "figure", "measured", "target"], table))


def configs(args: argparse.Namespace) -> list[Config]:
    """Every configuration to compare: the unsharded baseline and the sharded run, per thread count and
    per cap on browsers."""
    browsers = tuple(b.strip() for b in args.browsers.split(",") if b.strip())
    threads = [t.strip() for t in args.threads.split(",") if t.strip()] or [""]
    caps = [int(c) for c in args.max_connections.split(",") if c.strip()] or [0]
    out = []
    for t in threads:
        suffix = "" if not t else ", threads by policy" if t == "0" else f", {t} thread(s)"
        if args.baseline:
            out.append(Config(f"{args.baseline} unsharded{suffix}", 1, (args.baseline,), t, 0))
        for cap in caps:
            capped = f", max {cap} browsers" if cap else ""
            label = f"{args.shards} shards ({','.join(browsers)}){suffix}{capped}"
            out.append(Config(label, args.shards, browsers, t, cap))
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    before = machine()
    cache_dir = args.cache_dir or ManagerSettings.from_env().cache_dir
    await asyncio.to_thread(resolve_model, MODEL, cache_dir, progress)
    rows = []
    for tokens in [int(x) for x in args.sizes.split(",") if x.strip()]:
        rows += await run_side_by_side(configs(args), tokens, args)
    print(f"\n## Overhead breakdown: {MODEL}, sequential requests, wasm")
    for r in rows:
        print_config(r)
    print_targets(rows)
    after = machine()
    print(
        f"\nmachine: {before['cpus']} cpus, load average {before['loadavg_1m']} before and "
        f"{after['loadavg_1m']} after (other processes share these cores); code {before['code']}"
    )
    return {
        "benchmark": "overhead_breakdown",
        "model": MODEL,
        "machine_before": before,
        "machine_after": after,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
