"""Starting local shard workers as separate processes (``python -m shard_worker``).

The coordinator never imports the worker package; it runs it, as ``xshard worker`` does.
Each worker's output goes to a log file whose tail is shown if it fails to start. Whether a worker
accepts injected faults is exactly what ``LocalWorkers`` says (``--allow-fault-injection``), never
inherited from this process's ``XSHARD_ALLOW_FAULT_INJECTION``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from broker.clock import now_ms
from broker.process import die_with_parent
from broker.retry import poll
from broker.streams import Broker
from coordinator.errors import AllocationError

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
REGISTRY_POLL_S = 0.1  # how often the registry is read while local workers start
FAULT_INJECTION_ENV = "XSHARD_ALLOW_FAULT_INJECTION"


@dataclass
class LocalWorker:
    worker_id: str
    browser: str
    platform: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def worker_command(
    redis_url: str,
    browser: str,
    platform: str,
    namespace: str,
    cache_dir: Path,
    worker_id: str,
    heartbeat_s: float,
    *,
    allow_fault_injection: bool = False,
    wasm_threads: int = 0,
    warm_spare: bool = False,
) -> list[str]:
    flags = ["--allow-fault-injection"] if allow_fault_injection else []
    flags += ["--warm-spare"] if warm_spare else []
    flags += ["--wasm-threads", str(wasm_threads)] if wasm_threads > 0 else []
    return [
        sys.executable,
        "-m",
        "shard_worker",
        "--redis",
        redis_url,
        "--browser",
        browser,
        "--platform",
        platform,
        "--namespace",
        namespace,
        "--cache-dir",
        str(cache_dir),
        "--worker-id",
        worker_id,
        "--heartbeat-s",
        str(heartbeat_s),
        *flags,
    ]


class LocalWorkers:
    """Worker processes this coordinator started and must stop."""

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        cache_dir: Path,
        heartbeat_s: float,
        allow_fault_injection: bool = False,
        warm_spare: bool = False,
    ) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.cache_dir = cache_dir
        self.heartbeat_s = heartbeat_s
        self.allow_fault_injection = allow_fault_injection
        self.warm_spare = warm_spare  # each worker keeps a second browser with its shards loaded
        self.workers: dict[str, LocalWorker] = {}
        self.log_dir = cache_dir / "logs"

    def spawn(self, browser: str, platform: str, wasm_threads: int = 0) -> LocalWorker:
        """Start one worker process (its page gets ``wasm_threads`` onnxruntime-web threads; 0: its default)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        worker_id = f"{browser}-local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        log_path = self.log_dir / f"{worker_id}.log"
        cmd = worker_command(
            self.redis_url,
            browser,
            platform,
            self.namespace,
            self.cache_dir,
            worker_id,
            self.heartbeat_s,
            allow_fault_injection=self.allow_fault_injection,
            wasm_threads=wasm_threads,
            warm_spare=self.warm_spare,
        )
        env = {k: v for k, v in os.environ.items() if k != FAULT_INJECTION_ENV}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        w = LocalWorker(worker_id, browser, platform, proc, log_path)
        self.workers[worker_id] = w
        log.info("started local worker %s (pid %s, log %s)", worker_id, proc.pid, log_path)
        return w

    async def wait_registered(
        self, broker: Broker, ids: list[str], timeout_s: float, max_age_ms: int, stop: asyncio.Event | None = None
    ) -> None:
        """Wait until every worker in ``ids`` has registered; AllocationError (with the tails of their logs)
        when one exits first, when ``timeout_s`` passes, or when ``stop`` is set."""
        deadline = time.monotonic() + timeout_s
        pending = set(ids)
        async for _ in poll(REGISTRY_POLL_S, stop or asyncio.Event()):
            for wid in sorted(pending):
                w = self.workers[wid]
                if w.process.poll() is not None:
                    raise AllocationError(
                        f"local {w.browser} worker exited with {w.process.returncode} before registering:\n{w.tail()}"
                    )
            pending -= {w.worker_id for w in await broker.live_workers(int(now_ms()), max_age_ms)}
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {wid}:\n{self.workers[wid].tail()}" for wid in sorted(pending))
                raise AllocationError(f"{len(pending)} local worker(s) did not register within {timeout_s}s\n{tails}")
        raise AllocationError(f"stopped while waiting for {len(pending)} local worker(s) to register")

    def exited(self) -> list[str]:
        """Ids of the workers started here whose process has exited (a killed worker is known at once)."""
        return sorted(wid for wid, w in self.workers.items() if w.process.poll() is not None)

    async def stop_all(self) -> None:
        for w in self.workers.values():
            if w.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self.workers.values():
            try:
                await asyncio.wait_for(asyncio.to_thread(w.process.wait), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
            if w.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.process.pid, signal.SIGKILL)
                w.process.wait()
        self.workers.clear()
