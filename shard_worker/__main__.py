"""``python -m shard_worker``: run one shard worker (what ``xshard worker`` starts)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from broker.browsers import BROWSERS
from broker.errors import BrokerError

from .errors import WorkerError
from .settings import PLATFORMS, WorkerSettings, default_cache_dir

log = logging.getLogger("shard_worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xshard worker", description="Run one shard worker owning one browser.")
    p.add_argument("--redis", required=True, help="broker URL, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--browser", choices=BROWSERS, default="chromium")
    p.add_argument("--platform", choices=PLATFORMS, default="auto")
    p.add_argument("--namespace", default="default", help="key namespace shared with the coordinator")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"shard cache (default {default_cache_dir()})")
    p.add_argument("--worker-id", default="")
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--wasm-threads", type=int, default=0, help="0: min(4, cores)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def amain(settings: WorkerSettings) -> int:
    from .worker import ShardWorker

    async with ShardWorker(settings) as worker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop, f"signal {sig.name}")
        print(f"xshard worker {worker.id} ready", flush=True)
        reason = await worker.serve()
    log.info("worker %s exiting: %s", settings.worker_id, reason)
    return 0 if reason.startswith("signal") or reason == "stop requested" else 3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    settings = WorkerSettings(
        redis_url=args.redis,
        browser=args.browser,
        platform=args.platform,
        namespace=args.namespace,
        cache_dir=args.cache_dir or default_cache_dir(),
        worker_id=args.worker_id,
        heartbeat_s=args.heartbeat_s,
        wasm_threads=args.wasm_threads,
    )
    try:
        return asyncio.run(amain(settings))
    except (WorkerError, BrokerError) as e:
        print(f"xshard worker: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
