"""Per-hop overhead of a chain of identity shards, against the raw Redis Streams floor.

``python -m benchmarks.hop_overhead [--browsers chromium,firefox] [--requests N] [--warmup N]``

The model is ``tests.onnx_models.identity_chain`` cut into K shards of one Identity node each, so the
page's kernel does (almost) nothing and what is left of the end-to-end latency is transport.

Hops. A request through K shards crosses K+1 stream hops and makes K page round trips::

    coordinator -XADD-> stage0 (page) -hand_off-> stage1 (page) ... stage(K-1) (page) -hand_off-> coordinator
                hop 0                    hop 1                                        hop K

    overhead_ms  = end-to-end latency - sum of the page-measured kernel times
    per_stage_ms = overhead_ms / K          (one stage = one hop in + one page round trip)
    per_hop_ms   = overhead_ms / (K + 1)    <- the figure compared with the floor

Floor. The Redis round trip of the payload (on the same embedded valkey-server, from redis.asyncio:
XADD of the msgpack-encoded ``StageHop`` with its 196,608 tensor bytes, XREADGROUP COUNT 1, XACK) and a
bare echo of the tensor through the same kind of bridge to a page that does nothing with it
(``page_probe.EchoPage``, the browser as the worker launches it). The chain's floor is K+1 Redis round
trips plus K echoes; the ratio is the overhead over it (target <= 1.5x), and per hop over the Redis
round trip alone is printed beside it. One sample of each after every request, so all see the same load.

When the ratio misses the target (or with ``--investigate always``) the page bridge is probed
directly (``benchmarks.page_probe``): the browser as the worker launches it, and for Chromium bare and with
a raw CDP client enabling only Runtime or only Network. Everything is measured in this run; nothing is
simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.floors import VARIANTS, Floors, python_costs
from benchmarks.page_probe import LAUNCHES, EchoPage, probe_page
from benchmarks.report import fmt, machine, markdown_table, summarize, write_json
from broker.keys import Keys
from broker.messages import StageHop, encode
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings
from tests.onnx_models import identity_chain

SHAPE = (1, 128, 384)
TARGET_RATIO = 1.5  # overhead / (K+1 Redis round trips + K bare page echoes), issue 12
WAIT_S = 120.0  # for workers to register and to load their shards (a dead worker must not hang the run)
REQUEST_TIMEOUT_S = 30.0
CHAIN_TIMEOUT_S = 420.0  # start + all requests of one chain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hop_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--browsers", default="chromium", help="comma list, each its own chain (chromium)")
    p.add_argument("--stages", type=int, default=3, help="identity shards K in the chain (3)")
    p.add_argument("--platform", default="wasm", choices=("wasm", "webgpu", "auto"))
    p.add_argument("--requests", type=int, default=100, help="measured sequential requests (100)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured requests first (5)")
    p.add_argument(
        "--investigate",
        choices=("auto", "always", "never"),
        default="auto",
        help="probe the page bridge directly: auto = when the ratio misses the target",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# -- the chain ---------------------------------------------------------------------------------


async def one_request(m: ModelShardingManager, x: np.ndarray) -> dict[str, Any]:
    r = await m.run_inference_sharded({"x": x})
    if "error" in r:
        raise RuntimeError(f"request failed: {r['error']}")
    if not np.array_equal(r["result"]["y"], x):
        raise RuntimeError("the identity chain changed the tensor")
    met = r["metrics"]
    stages = sorted(met["component_results"].values(), key=lambda c: c["shard_index"])
    e2e = float(met["inference_time_ms"])
    return {
        "e2e_ms": e2e,
        "kernel_ms": float(met["kernel_time_ms"]),
        "queue_ms": [c["queue_ms"] for c in stages],
        "page_ms": [c["worker_ms"] - c["kernel_ms"] for c in stages],
        "stage_kernel_ms": [c["kernel_ms"] for c in stages],
        "tail_ms": e2e - sum(c["queue_ms"] + c["worker_ms"] for c in stages),
    }


def chain_figures(samples: list[dict[str, Any]], k: int) -> dict[str, Any]:
    overhead = [s["e2e_ms"] - s["kernel_ms"] for s in samples]
    return {
        "e2e_ms": summarize([s["e2e_ms"] for s in samples]),
        "kernel_sum_ms": summarize([s["kernel_ms"] for s in samples]),
        "overhead_ms": summarize(overhead),
        "per_stage_ms": summarize([o / k for o in overhead]),
        "per_hop_ms": summarize([o / (k + 1) for o in overhead]),
        "queue_ms": [summarize([s["queue_ms"][i] for s in samples]) for i in range(k)],
        "page_rt_ms": [summarize([s["page_ms"][i] for s in samples]) for i in range(k)],
        "stage_kernel_ms": [summarize([s["stage_kernel_ms"][i] for s in samples]) for i in range(k)],
        "tail_ms": summarize([s["tail_ms"] for s in samples]),
    }


def probe_job(x: np.ndarray, k: int) -> StageHop:
    return StageHop(
        request_id=uuid.uuid4().hex,
        plan_id=uuid.uuid4().hex[:16],
        stage_index=0,
        route=tuple(Keys().stage("floorplan", i) for i in range(k)),
        reply_stream=Keys().reply("floorcoordinator"),
        tensors={"x": x},
        enqueued_ms=time.time() * 1000.0,
    )


async def measure(m: ModelShardingManager, x: np.ndarray, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Warm up, then N requests, each followed by one sample of every floor variant."""
    if not await m.initialize_sharding():
        raise RuntimeError(f"initialize_sharding failed: {m.last_error}")
    url = m.get_metrics()["broker"]
    progress(f"{label}: {args.warmup} warm-up + {args.requests} requests, each followed by the floor round trips")
    samples, floor_samples, echoes = [], [], []
    job = probe_job(x, args.stages)
    async with Floors(url, job) as floors, EchoPage(label, args.platform) as echo:
        for i in range(args.warmup + args.requests):
            s = await one_request(m, x)
            f = await floors.sample(rotate=i)
            e = await echo.sample({"x": x})
            if i >= args.warmup:
                samples.append(s)
                floor_samples.append(f)
                echoes.append(e)
    alloc = m.get_metrics()["browser_allocation"]
    chain = chain_figures(samples, args.stages)
    floor = {v: summarize([f[v] for f in floor_samples]) for v in VARIANTS}
    k = args.stages
    # the floor of the whole chain: K+1 Redis round trips of the payload and K bare page echoes of it
    chain_floor = [(k + 1) * f["raw"] + k * e for f, e in zip(floor_samples, echoes, strict=True)]
    floor["echo"] = summarize(echoes)
    floor["chain"] = summarize(chain_floor)
    return {
        "label": label,
        "stages": args.stages,
        "hops": args.stages + 1,
        "execution_providers": sorted({a["execution_provider"] for a in alloc.values()}),
        "user_agent": next(iter(alloc.values()))["user_agent"],
        "chain": chain,
        "floor": floor,
        "floor_payload_bytes": len(encode(job)),
        "ratio_p50": chain["overhead_ms"]["p50"] / floor["chain"]["p50"],
        "ratio_mean": chain["overhead_ms"]["mean"] / floor["chain"]["mean"],
        "redis_ratio_p50": chain["per_hop_ms"]["p50"] / floor["raw"]["p50"],
        "python_costs_ms": python_costs(m.shards.profile, job) if m.shards else {},
    }


async def run_chain(browser: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    k = args.stages
    model = identity_chain(workdir / f"identity_chain_{k}.onnx", stages=k, shape=SHAPE)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    namespace = f"hopbench{uuid.uuid4().hex[:8]}"
    settings = ManagerSettings(
        cache_dir=workdir / "cache",
        namespace=namespace,
        worker_wait_s=WAIT_S,
        assign_timeout_s=WAIT_S,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    m = ModelShardingManager(
        str(model),
        num_shards=k,
        browsers=[browser],
        platform=args.platform,
        settings=settings,
        progress=progress,
    )
    try:
        async with asyncio.timeout(CHAIN_TIMEOUT_S):
            result = await measure(m, x, args, browser)
        assert m.shards is not None
        result["browser"] = browser
        result["shard0"] = (
            m.shards.shard_dir,
            m.shards.shard_sha256[0],
            m.shards.plan.stages[0].input_names[0],
        )
    finally:
        await m.close()
    return result


# -- investigation -----------------------------------------------------------------------------


async def investigate(browser: str, shard0: tuple[Path, str, str], args: argparse.Namespace) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    launches = list(LAUNCHES) if browser == "chromium" else ["worker"]
    out = {}
    for launch in launches:
        progress(f"{browser}: probing the page bridge directly ({launch})")
        out[launch] = await probe_page(browser, launch, shard0, x, args.platform, args.requests, args.warmup)
    return out


# -- report ------------------------------------------------------------------------------------


def verdict(ratio: float) -> str:
    return "PASS" if ratio <= TARGET_RATIO else "MISS"


def print_report(runs: list[dict[str, Any]], probes: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    k = args.stages
    hops = " -> ".join(["coordinator", *(f"stage{i}" for i in range(k)), "coordinator"])
    print(f"\n## Hop overhead: identity chain, K={k} shards, 1x128x384 float32 ({int(np.prod(SHAPE)) * 4:,} B)")
    print(f"execution provider: {args.platform}; {args.requests} sequential requests, {args.warmup} warm-ups\n")
    print(f"hops: {hops} = {k + 1} stream hops and {k} page round trips")
    print(f"per-stage = (e2e - sum kernel) / {k}; per-hop = (e2e - sum kernel) / {k + 1}: per-hop is compared")
    payload_bytes = runs[0]["floor_payload_bytes"]
    print("floor: XADD + XREADGROUP + XACK from redis.asyncio on the same valkey-server; one sample of each")
    print("variant after every request, variants in rotating order;")
    print(f"payload = broker.messages.encode(StageHop), {payload_bytes:,} B, encoded once before timing\n")
    stats = [
        ("e2e_ms", "p50"),
        ("e2e_ms", "mean"),
        ("kernel_sum_ms", "p50"),
        ("overhead_ms", "p50"),
        ("per_stage_ms", "p50"),
        ("per_stage_ms", "mean"),
        ("per_hop_ms", "p50"),
        ("per_hop_ms", "mean"),
    ]
    headers = ["chain", "n", *(f"{key.removesuffix('_ms').replace('_', ' ')} {stat}" for key, stat in stats)]
    rows = [[r["label"], r["chain"]["e2e_ms"]["n"], *(fmt(r["chain"][key][stat]) for key, stat in stats)] for r in runs]
    print(markdown_table(headers, rows))
    print()
    rows = [
        [
            r["label"],
            fmt(r["floor"]["raw"]["p50"], 3),
            fmt(r["floor"]["echo"]["p50"], 3),
            fmt(r["floor"]["chain"]["p50"], 3),
            fmt(r["chain"]["overhead_ms"]["p50"], 3),
            f"{r['ratio_p50']:.2f}x",
            f"<= {TARGET_RATIO:.1f}x",
            verdict(r["ratio_p50"]),
            f"{r['redis_ratio_p50']:.1f}x",
        ]
        for r in runs
    ]
    headers = ["chain", "Redis RT p50 ms", "page echo p50 ms", "chain floor p50 ms", "overhead p50 ms", "ratio"]
    print(markdown_table([*headers, "target", "verdict", "per hop / Redis RT only"], rows))
    print(f"chain floor = {k + 1} x Redis RT + {k} x bare echo through the bridge to a page that does nothing")
    print("\n### Floors (same valkey-server, redis.asyncio, ms, one sample of each after every request)\n")
    rows = [
        [f"{r['label']}: {v}, {label}", fmt(r["floor"][v]["p50"], 3), fmt(r["floor"][v]["mean"], 3)]
        for r in runs
        for v, label in VARIANTS.items()
    ]
    print(markdown_table(["variant", "p50", "mean"], rows))
    print_breakdown(runs, k)
    print("\n### Python-side CPU per call (this process, p50 ms)\n")
    names = list(runs[0]["python_costs_ms"])
    rows = [[n, fmt(runs[0]["python_costs_ms"][n]["p50"], 3)] for n in names]
    print(markdown_table(["step", "p50 ms"], rows))
    if probes:
        print_probes(probes)


def print_breakdown(runs: list[dict[str, Any]], k: int) -> None:
    print("\n### Where the time goes (ms, from the stage traces; the means add up to the e2e mean)\n")

    def cells(key: str, i: int | None = None) -> list[str]:
        picked = [r["chain"][key] if i is None else r["chain"][key][i] for r in runs]
        return [fmt(p[stat]) for p in picked for stat in ("p50", "mean")]

    rows = []
    for i in range(k):
        src = "coordinator" if i == 0 else f"stage{i - 1} hand_off"
        rows.append([f"hop {i}: {src} -> stage{i} (queue_ms)", *cells("queue_ms", i)])
        rows.append([f"stage{i} page round trip (worker_ms - kernel_ms)", *cells("page_rt_ms", i)])
        rows.append([f"stage{i} kernel_ms", *cells("stage_kernel_ms", i)])
    rows.append([f"hop {k}: stage{k - 1} hand_off -> coordinator, + coordinator work", *cells("tail_ms")])
    rows.append(["end-to-end", *cells("e2e_ms")])
    print(markdown_table(["segment", *(f"{r['label']} {s}" for r in runs for s in ("p50", "mean"))], rows))
    print("\nqueue_ms = producer encode + XADD (in hand_off's MULTI) + consumer wake-up + XREADGROUP + decode;")
    print(f"hop {k} = e2e - sum(queue_ms + worker_ms): last hand_off, reply read and decode, coordinator work.")
    for r in runs:
        c = r["chain"]
        hop_ms = sum(q["mean"] for q in c["queue_ms"]) + c["tail_ms"]["mean"]
        page_ms = sum(p["mean"] for p in c["page_rt_ms"])
        per_hop = hop_ms / (k + 1)
        vs_raw = fmt(per_hop / r["floor"]["raw"]["mean"], 1)
        vs_xproc = fmt(per_hop / r["floor"]["xproc"]["mean"], 1)
        print(
            f"{r['label']} (means): of {fmt(c['overhead_ms']['mean'])} ms overhead, the {k + 1} stream hops "
            f"take {fmt(hop_ms)} ms ({fmt(per_hop)}/hop = {vs_raw}x raw floor, {vs_xproc}x xproc floor), "
            f"the {k} page round trips {fmt(page_ms)} ms ({fmt(page_ms / k)}/stage)"
        )


def print_probes(probes: dict[str, dict[str, Any]]) -> None:
    print("\n### Page bridge probed directly, no Redis (p50 ms)\n")
    cols = [(f"{browser}, {launch}", p) for browser, by_launch in probes.items() for launch, p in by_launch.items()]
    kinds = [
        ("text_ping_ms", "text ping (release of an unloaded key)"),
        ("frame_in_error_out_ms", "196,608 B frame in, text error out"),
        ("full_run_ms", "identity run: frame in, frame out"),
        ("kernel_ms", "  of which page kernel_ms"),
    ]
    rows = [[label, *(fmt(p[key]["p50"], 3) for _, p in cols)] for key, label in kinds]
    cdp = [fmt(p["cdp_bytes_per_run"], 0) if "cdp_bytes_per_run" in p else "-" for _, p in cols]
    rows.append(["raw CDP client: bytes received per identity run", *cdp])
    print(markdown_table(["probe", *(name for name, _ in cols)], rows))
    print("worker: as shard_worker launches it (for Chromium, Playwright attached over CDP until the page is up,")
    print("        then detached)")
    print("bare: Chromium with the worker's flags, no CDP client")
    print("bare+runtime / bare+network: bare plus one raw CDP client enabling only Runtime+Inspector / Network")


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    browsers = [b.strip() for b in args.browsers.split(",") if b.strip()]
    before = machine()
    runs: list[dict[str, Any]] = []
    probes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="xshard-hopbench-") as tmp:
        for browser in browsers:
            run = await run_chain(browser, args, Path(tmp))
            runs.append(run)
            missed = run["ratio_p50"] > TARGET_RATIO
            if args.investigate == "always" or (args.investigate == "auto" and missed):
                probes[browser] = await investigate(browser, run["shard0"], args)
    print_report(runs, probes, args)
    after = machine()
    print(
        f"\nmachine: {before['cpus']} cpus, load average {before['loadavg_1m']} before and "
        f"{after['loadavg_1m']} after (other processes share these cores); code {before['code']}"
    )
    for r in runs:
        r.pop("shard0", None)
    return {
        "benchmark": "hop_overhead",
        "shape": list(SHAPE),
        "platform": args.platform,
        "stages": args.stages,
        "requests": args.requests,
        "warmup": args.warmup,
        "target_ratio": TARGET_RATIO,
        "machine_before": before,
        "machine_after": after,
        "runs": runs,
        "page_probes": probes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
