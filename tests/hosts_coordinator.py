"""The coordinator host of ``test_hosts``: run with ``python -m tests.hosts_coordinator`` inside that
host's network namespace, where only the test's private subnet is reachable.

It waits for the expected workers, deploys MiniLM in 2 shards on them (through a password-protected
broker: ``REDIS_URL``), sends the requests a few at a time, runs ``--cut`` (a command that takes one
worker host's link down) once ``--cut-after`` of them have come back, and after the last one waits until
the cut host's workers have been declared dead, runs ``--restore`` and waits until they heartbeat again.
It writes each request's inputs and outputs (``req_<i>.npz``) and ``summary.json`` to ``--out``; the test
compares them with native onnxruntime."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker.messages import RecoveryEvent
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings

log = logging.getLogger("hosts_coordinator")

CONCURRENCY = 3
WAIT_S = 240.0
POLL_S = 0.2


def batches(n: int, seed: int = 11) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seq = int(rng.integers(4, 32))
        mask = np.ones((1, seq), np.int64)
        mask[0, seq - i % 3 :] = 0 if i % 3 else 1
        out.append({"input_ids": rng.integers(0, 30522, (1, seq)).astype(np.int64), "attention_mask": mask})
    return out


async def live_ids(broker: Broker, max_age_ms: int) -> set[str]:
    return {w.worker_id for w in await broker.live_workers(int(time.time() * 1000), max_age_ms)}


async def wait_live(broker: Broker, ids: set[str], alive: bool, max_age_ms: int, timeout_s: float) -> float:
    """Seconds until every one of ``ids`` is live (``alive``) or none is; -1 after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        live = await live_ids(broker, max_age_ms)
        if (ids <= live) if alive else not (ids & live):
            return time.monotonic() - started
        await asyncio.sleep(POLL_S)
    return -1.0


async def send_all(
    manager: ModelShardingManager, inputs: list[dict[str, np.ndarray]], cut_after: int, cut: list[str]
) -> list[dict[str, Any]]:
    sem, done = asyncio.Semaphore(CONCURRENCY), [0]
    results: list[dict[str, Any]] = [{} for _ in inputs]

    async def one(i: int) -> None:
        async with sem:
            results[i] = await manager.run_inference_sharded(inputs[i])
        done[0] += 1
        if done[0] == cut_after:
            await asyncio.to_thread(subprocess.run, cut, check=True)
            log.warning("cut after %d requests came back: %s", done[0], " ".join(cut))

    await asyncio.gather(*(one(i) for i in range(len(inputs))))
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url, settings = os.environ["REDIS_URL"], ManagerSettings(cache_dir=args.cache_dir, namespace=args.namespace)
    expected, lost = set(args.workers), set(args.lost)
    summary: dict[str, Any] = {}
    async with Broker(url, args.namespace) as broker:
        if await wait_live(broker, expected, True, settings.heartbeat_max_age_ms, WAIT_S) < 0:
            raise SystemExit(f"workers did not all register: {sorted(expected - await live_ids(broker, 2000))}")
        manager = ModelShardingManager(
            "all-MiniLM-L6-v2",
            num_shards=2,
            browsers=["chromium", "firefox"],
            platform="wasm",
            redis_url=url,
            settings=settings,
        )
        if not await manager.initialize_sharding():
            raise SystemExit(f"initialize_sharding failed: {manager.last_error}")
        try:
            m = manager.get_metrics()
            summary.update(model_path=m["model_path"], shards=[s["sha256"] for s in m["shards"]], broker=m["broker"])
            summary["allocation"] = {str(k): v for k, v in m["browser_allocation"].items()}
            inputs = batches(args.requests)
            results = await send_all(manager, inputs, args.cut_after, args.cut)
            summary["declared_dead_s"] = await wait_live(broker, lost, False, settings.heartbeat_max_age_ms, 30)
            await asyncio.to_thread(subprocess.run, args.restore, check=True)
            summary["rejoined_s"] = await wait_live(broker, lost, True, settings.heartbeat_max_age_ms, 90)
            summary["errors"] = {i: r.get("error") for i, r in enumerate(results) if "error" in r}
            for i, (x, r) in enumerate(zip(inputs, results, strict=True)):
                arrays: dict[str, Any] = {
                    **x,
                    **{f"out_{k}": np.asarray(v) for k, v in (r.get("result") or {}).items()},
                }
                np.savez(args.out / f"req_{i}.npz", **arrays)
            events = [e for e in await broker.read_events() if isinstance(e, RecoveryEvent)]
            summary["recovery"] = [(e.failure, e.worker_id, e.success) for e in events]
            summary["metrics_requests"] = manager.get_metrics()["requests"]
        finally:
            await manager.close()
    return summary


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--namespace", required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--workers", nargs="+", required=True)
    p.add_argument("--lost", nargs="+", required=True, help="the workers of the host that is cut")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--cut-after", type=int, default=10)
    p.add_argument("--cut", type=json.loads, required=True, help="JSON argv")
    p.add_argument("--restore", type=json.loads, required=True, help="JSON argv")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary = asyncio.run(run(args))
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
