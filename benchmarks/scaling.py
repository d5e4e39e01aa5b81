"""Throughput of enqueued inference jobs as the deployment scales: 1 and 2 workers per stage, 1 and 2
coordinator services, in one run, with the machine's core count and load beside the figures.

Everything is real and local: an embedded valkey, ``xshard worker`` processes with headless Chromium and
Firefox, ``xshard coordinator`` processes (arq workers), jobs enqueued with ``enqueue_inference`` and
read back with arq's ``Job.result``. Each configuration first warms every coordinator (a few jobs), then
times ``--jobs`` jobs from the first enqueue to the last result (jobs/s counts the successful ones; a
failed job is counted and its error kept). On a machine with few cores the
browsers, coordinators and broker compete for them: read the figures beside ``cpus`` and ``loadavg``.

    python -m benchmarks.scaling [--jobs 40] [--json benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import fmt, machine, markdown_table, percentile, write_json
from broker.embedded import EmbeddedValkey
from broker.streams import Broker
from coordinator.service import JobFailed, enqueue_inference, open_queue
from tests.faults_support import start_xshard_worker, stop_processes, wait_until
from tests.onnx_models import residual_mlp, sample_tokens
from tests.service_support import CoordinatorProcess, coordinator_argv

SHARDS = 2
BROWSERS = ("chromium", "firefox")
RESULT_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=40, help="timed jobs per configuration (default 40)")
    p.add_argument("--max-jobs", type=int, default=4, help="jobs at once per coordinator (default 4)")
    p.add_argument("--layers", type=int, default=8, help="residual MLP blocks of the model (default 8)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the model (default 256)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


async def timed_jobs(url: str, ns: str, model: Path, count: int, cache: Path) -> dict[str, Any]:
    """``count`` jobs enqueued back to back; wall time from the first enqueue to the last result."""
    redis = await open_queue(url, ns)
    try:
        inputs = [sample_tokens(1, 4 + i % 12, seed=i) for i in range(count)]
        started = time.perf_counter()
        jobs = [
            await enqueue_inference(redis, model=str(model), inputs=x, shards=SHARDS, namespace=ns, validate=False)
            for x in inputs
        ]
        results, errors = [], []
        for job in jobs:
            try:
                results.append(await job.result(timeout=RESULT_TIMEOUT_S))
            except JobFailed as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
        wall_s = time.perf_counter() - started
    finally:
        await redis.aclose()
    latencies = [float(r["metrics"]["inference_time_ms"]) for r in results]
    return {
        "jobs": count,
        "failed": len(errors),
        "errors": errors[:5],
        "wall_s": wall_s,
        "jobs_per_s": len(results) / wall_s,
        "request_ms_p50": percentile(latencies, 50),
    }


async def one_config(url: str, ns: str, model: Path, coordinators: int, args: argparse.Namespace, work: Path) -> dict:
    cache = work / "cache"
    argv = coordinator_argv(url, ns, cache, "--max-jobs", str(args.max_jobs))
    procs = [CoordinatorProcess(argv, cache, work / f"{ns}-c{coordinators}-{i}.log") for i in range(coordinators)]
    try:
        for proc in procs:
            await proc.start()
        await timed_jobs(url, ns, model, 4 * coordinators, cache)  # warm every coordinator's manager
        return await timed_jobs(url, ns, model, args.jobs, cache)
    finally:
        for proc in procs:
            await proc.stop()


async def with_workers(url: str, per_stage: int, model: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    ns = f"scaling-w{per_stage}"
    ids = [f"{b}-{ns}-{i}" for i in range(per_stage) for b in BROWSERS]
    procs = [start_xshard_worker(url, wid.split("-")[0], ns, work / "cache", wid) for wid in ids]
    rows = []
    try:
        async with Broker(url, ns) as broker:

            async def registered() -> bool:
                live = await broker.live_workers(int(time.time() * 1000), 2000)
                return {w.worker_id for w in live} >= set(ids)

            await wait_until(registered, 120, f"{len(ids)} workers")
        for coordinators in (1, 2):
            print(f"  {per_stage} worker(s) per stage, {coordinators} coordinator(s) ...", file=sys.stderr, flush=True)
            res = await one_config(url, ns, model, coordinators, args, work)
            rows.append({"workers_per_stage": per_stage, "coordinators": coordinators, **res})
    finally:
        stop_processes(procs)
    return rows


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xshard-scaling-") as tmp, EmbeddedValkey() as valkey:
        work = Path(tmp)
        model = residual_mlp(work / "mlp.onnx", layers=args.layers, hidden=args.hidden, vocab=50)
        rows = []
        for per_stage in (1, 2):
            rows += await with_workers(valkey.url, per_stage, model, args, work)
    return {"machine": machine(), "model": f"residual MLP {args.layers}x{args.hidden}, {SHARDS} shards", "runs": rows}


def print_report(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"\nscaling: {out['model']}; cpus {m['cpus']}, load {m['loadavg_1m']} (1 min), {m['code']}")
    heads = ("workers/stage", "coordinators", "jobs", "failed", "wall s", "jobs/s", "request p50 ms", "cpus")
    rows = [
        (
            r["workers_per_stage"],
            r["coordinators"],
            r["jobs"],
            r["failed"],
            fmt(r["wall_s"]),
            fmt(r["jobs_per_s"]),
            fmt(r["request_ms_p50"], 1),
            m["cpus"],
        )
        for r in out["runs"]
    ]
    print(markdown_table(heads, rows))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(amain(args))
    print_report(out)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
