"""``python -m shard_worker``: run one shard worker (what ``xshard worker`` starts)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from broker.address import CA_FILE_ENV, redact
from broker.artifact_server import ARTIFACT_URL_ENV
from broker.browsers import BROWSERS
from broker.errors import BrokerError
from broker.kinds import PLATFORMS, Platform

from .errors import WorkerError
from .settings import FAULT_INJECTION_ENV, PAGE_BUDGET_ENV, WorkerSettings, default_cache_dir, env_flag

log = logging.getLogger("shard_worker")

WASM_THREADS_ENV = "XSHARD_WASM_THREADS"
WARM_SPARE_ENV = "XSHARD_WARM_SPARE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xshard worker", description="Run one shard worker owning one browser.")
    p.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL") or None,
        required=not os.environ.get("REDIS_URL"),
        help="broker URL (default: REDIS_URL), redis://[:password@]host:port/0 or rediss://...; "
        "a password is better given in REDIS_URL than on the command line",
    )
    p.add_argument(
        "--redis-ca-file",
        default=os.environ.get(CA_FILE_ENV, ""),
        help=f"CA file verifying a rediss:// broker (default: {CA_FILE_ENV})",
    )
    p.add_argument(
        "--artifact-url",
        default=os.environ.get(ARTIFACT_URL_ENV, ""),
        help=f"http://host:port other hosts fetch this worker's shard files at (default: {ARTIFACT_URL_ENV}, "
        "else this host's address on the route to the broker, on a free port)",
    )
    p.add_argument("--browser", choices=BROWSERS, default="chromium")
    p.add_argument("--platform", choices=PLATFORMS, default=Platform.AUTO.value)
    p.add_argument("--namespace", default="default", help="key namespace shared with the coordinator")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"shard cache (default {default_cache_dir()})")
    p.add_argument("--worker-id", default="")
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument(
        "--wasm-threads",
        type=int,
        default=int(os.environ.get(WASM_THREADS_ENV) or 0),
        help=f"onnxruntime-web threads in the page; 0: min(4, cores) (default: {WASM_THREADS_ENV} or 0)",
    )
    p.add_argument(
        "--warm-spare",
        action="store_true",
        default=env_flag(WARM_SPARE_ENV),
        help=f"keep a second browser up to replace a lost one at once (also {WARM_SPARE_ENV}=1)",
    )
    p.add_argument(
        "--no-fuse-stages",
        dest="fuse_stages",
        action="store_false",
        help="hop through the stream between consecutive stages this worker serves (default: run them in one page op)",
    )
    p.add_argument(
        "--allow-fault-injection",
        action="store_true",
        default=env_flag(FAULT_INJECTION_ENV),
        help=f"accept injected faults (tests and xshard fault-test only; also {FAULT_INJECTION_ENV}=1)",
    )
    p.add_argument(
        "--page-budget-bytes",
        type=int,
        default=int(os.environ.get(PAGE_BUDGET_ENV) or 0),
        help=f"cap the page's measured memory budget (tests; default: {PAGE_BUDGET_ENV} or no cap)",
    )
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
        redis_ca_file=args.redis_ca_file,
        artifact_url=args.artifact_url,
        browser=args.browser,
        platform=args.platform,
        namespace=args.namespace,
        cache_dir=args.cache_dir or default_cache_dir(),
        worker_id=args.worker_id,
        heartbeat_s=args.heartbeat_s,
        wasm_threads=args.wasm_threads,
        fuse_stages=args.fuse_stages,
        warm_spare=args.warm_spare,
        allow_fault_injection=args.allow_fault_injection,
        page_budget_bytes=args.page_budget_bytes,
    )
    try:
        return asyncio.run(amain(settings))
    except (WorkerError, BrokerError) as e:
        print(f"xshard worker: {redact(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
