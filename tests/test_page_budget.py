"""Each page measures its memory budget and its worker registers it: the WebAssembly memory the loaded
onnxruntime-web build can grow to (32-bit: at most 4 GiB), lowered by the browser's limits where exposed,
and capped by ``--page-budget-bytes``. Real valkey, real ``python -m shard_worker`` processes, real headless
Chromium and Firefox."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.registry import WorkerInfo, WorkerState
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.faults_support import stop_processes, wait_until
from tests.onnx_models import residual_mlp

pytestmark = pytest.mark.browser

WASM32_MAX_BYTES = 2**32
CAP_BYTES = 300_000_000


def start_worker(url: str, namespace: str, cache_dir: Path, browser: str, cap_bytes: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "shard_worker", "--redis", url, "--browser", browser, "--platform", "wasm"]
    cmd += ["--namespace", namespace, "--cache-dir", str(cache_dir), "--worker-id", f"{browser}-{namespace}"]
    cmd += ["--page-budget-bytes", str(cap_bytes), "--log-level", "WARNING"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def test_each_page_registers_its_measured_budget_and_the_cap_lowers_it(
    cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium", "firefox")
    procs = [
        start_worker(valkey.url, namespace, cache_dir, "chromium", CAP_BYTES),
        start_worker(valkey.url, namespace, cache_dir, "firefox", 0),
    ]
    try:
        async with Broker(valkey.url, namespace) as broker:
            found: dict[str, WorkerInfo] = {}

            async def registered() -> bool:
                assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
                live = await broker.live_workers(int(time.time() * 1000), 2000)
                found.update({w.browser: w for w in live if w.state is WorkerState.READY})
                return len(found) == 2

            await wait_until(registered, 120, "both workers to register")
    finally:
        await asyncio.to_thread(stop_processes, procs)
    for info in found.values():
        memory = info.capabilities["memory"]
        assert 0 < memory["wasm_max_bytes"] <= WASM32_MAX_BYTES, memory
        assert 0 < memory["budget_bytes"] <= memory["wasm_max_bytes"], memory
    assert found["chromium"].page_budget_bytes == CAP_BYTES  # measured is larger; the cap wins
    assert found["firefox"].page_budget_bytes == found["firefox"].capabilities["memory"]["budget_bytes"]


async def test_a_shard_is_never_sent_to_a_page_it_does_not_fit(
    tmp_path: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium")
    model = residual_mlp(tmp_path / "m.onnx", layers=2, hidden=16)
    proc = start_worker(valkey.url, namespace, cache_dir, "chromium", 1_000)  # far less than any shard needs
    settings = ManagerSettings(cache_dir=cache_dir, namespace=namespace, worker_wait_s=90)
    manager = ModelShardingManager(str(model), num_shards=1, redis_url=valkey.url, settings=settings)
    try:
        async with Broker(valkey.url, namespace) as broker:

            async def registered() -> bool:
                assert proc.poll() is None, proc.returncode
                live = await broker.live_workers(int(time.time() * 1000), 2000)
                return any(w.state is WorkerState.READY for w in live)

            await wait_until(registered, 120, "the worker to register")
            assert not await manager.initialize_sharding()
            assert "shard 0 needs" in (manager.last_error or "") and "1.0 kB" in (manager.last_error or "")
            (info,) = await broker.live_workers(int(time.time() * 1000), 2000)
            assert info.stages == ()  # it was never assigned the shard
    finally:
        await manager.close()
        await asyncio.to_thread(stop_processes, [proc])
