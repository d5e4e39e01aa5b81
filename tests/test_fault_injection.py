"""Fault injection stays out of production: a worker started without ``--allow-fault-injection`` refuses
an ``Inject`` and says so, and its page goes on computing correctly; one started with it arms the fault
and its next kernel throws. The page enforces the same switch itself: a fault sent straight to a
production page, past its worker, is ignored. Real valkey, real ``python -m shard_worker`` processes,
real headless Chromium running onnxruntime-web; outputs checked against native onnxruntime."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.browsers import find_ort_dist
from broker.registry import WorkerState
from broker.streams import Broker
from coordinator.cli.faultlab import inject_fault
from coordinator.manager import ModelShardingManager
from coordinator.settings import ManagerSettings
from shard_worker.bridge import Bridge
from shard_worker.browser import BrowserProcess
from shard_worker.errors import PageError
from shard_worker.server import StaticServer
from tests.conftest import require_browsers
from tests.faults_support import assert_matches_native, stop_processes, wait_until
from tests.native import run_whole
from tests.onnx_models import residual_mlp, sample_tokens

pytestmark = pytest.mark.browser

FAULT_INJECTION_ENV = "XSHARD_ALLOW_FAULT_INJECTION"
REFUSAL = "fault injection is disabled on worker {} (start it with --allow-fault-injection)"
PAGE_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return residual_mlp(tmp_path_factory.mktemp("injection") / "mlp.onnx", layers=2, hidden=16, vocab=50)


def start_worker(url: str, namespace: str, cache_dir: Path, worker_id: str, *, allow: bool) -> subprocess.Popen[bytes]:
    """``python -m shard_worker`` with the flag or without it, and never with the suite's environment switch."""
    cmd = [sys.executable, "-m", "shard_worker", "--redis", url, "--browser", "chromium", "--platform", "wasm"]
    cmd += ["--namespace", namespace, "--cache-dir", str(cache_dir), "--worker-id", worker_id, "--log-level", "WARNING"]
    if allow:
        cmd.append("--allow-fault-injection")
    env = {k: v for k, v in os.environ.items() if k != FAULT_INJECTION_ENV}
    env["PYTHONPATH"] = os.getcwd()
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@asynccontextmanager
async def one_worker(
    model: Path, url: str, namespace: str, cache_dir: Path, *, allow: bool
) -> AsyncIterator[tuple[ModelShardingManager, Broker, str]]:
    """One external worker and a manager on it with fault tolerance ``none``: a kernel that throws is not
    retried away, its request goes straight to the dead letter."""
    require_browsers("chromium")
    wid = f"chromium-{namespace}-{'test' if allow else 'prod'}"
    proc = start_worker(url, namespace, cache_dir, wid, allow=allow)
    settings = ManagerSettings(cache_dir=cache_dir, namespace=namespace, worker_wait_s=90)
    manager = ModelShardingManager(
        str(model), num_shards=1, browsers=["chromium"], fault_tolerance_level="none", redis_url=url, settings=settings
    )
    try:
        async with Broker(url, namespace) as broker:

            async def registered() -> bool:
                assert proc.poll() is None, f"worker {wid} exited with {proc.returncode}"
                live = await broker.live_workers(int(time.time() * 1000), 2000)
                return any(w.worker_id == wid and w.state is WorkerState.READY for w in live)

            await wait_until(registered, 90, f"worker {wid} to register")
            assert await manager.initialize_sharding(), manager.last_error
            yield manager, broker, wid
    finally:
        await manager.close()
        await asyncio.to_thread(stop_processes, [proc])


async def test_a_production_worker_refuses_an_inject_and_its_page_runs_the_next_request_correctly(
    model: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    async with one_worker(model, valkey.url, namespace, cache_dir, allow=False) as (manager, broker, wid):
        reply = await inject_fault(broker, wid, "kernel-error", 1)
        assert reply.worker_id == wid and not reply.accepted, reply
        assert reply.reason == REFUSAL.format(wid)
        inputs = sample_tokens(2, 7, seed=3)
        res = await manager.run_inference_sharded(inputs)  # fault tolerance none: a throw would dead-letter it
        assert "result" in res, res
        assert_matches_native(model, inputs, res["result"])
        assert await manager.dead_letters() == []


async def test_a_worker_started_with_fault_injection_accepts_an_inject_and_its_next_kernel_throws(
    model: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    async with one_worker(model, valkey.url, namespace, cache_dir, allow=True) as (manager, broker, wid):
        reply = await inject_fault(broker, wid, "kernel-error", 1)
        assert reply.worker_id == wid and reply.accepted and reply.reason == "", reply
        res = await manager.run_inference_sharded(sample_tokens(1, 5, seed=1))
        assert res.get("error_kind") == "dead_letter", res
        letters = await manager.dead_letters()
        assert len(letters) == 1, letters
        dead = letters[0][1]
        assert dead is not None and dead.request_id == res["request_id"], letters
        assert "injected kernel error" in dead.error, dead.error
        inputs = sample_tokens(2, 6, seed=2)  # one fault was armed, and it is spent
        after = await manager.run_inference_sharded(inputs)
        assert "result" in after, after
        assert_matches_native(model, inputs, after["result"])


SHA = "ab" * 32  # the page serves /shards/<64 hex>.onnx; any name will do for a bare page


@pytest.fixture
def shard_dir(model: Path, tmp_path: Path) -> Path:
    """A shard cache holding the whole model as one shard named ``SHA``."""
    out = tmp_path / "shards"
    out.mkdir()
    (out / f"{SHA}.onnx").write_bytes(model.read_bytes())
    return out


@asynccontextmanager
async def bare_page(shard_dir: Path, *, faults: bool) -> AsyncIterator[Bridge]:
    """The shard page in Chromium with no worker in front of it, the model loaded as session ``m``."""
    require_browsers("chromium")
    ort_dir = find_ort_dist()
    assert ort_dir is not None, "onnxruntime-web is not installed (npm ci)"
    server = StaticServer(ort_dir, shard_dir).start()
    bridge = await Bridge().start()
    browser: BrowserProcess | None = None
    try:
        url = f"http://127.0.0.1:{server.port}/#ws={bridge.port}&token={bridge.token}&platform=wasm&threads=1"
        browser = await BrowserProcess("chromium", url + ("&faults=1" if faults else "")).launch()
        await bridge.wait_hello(PAGE_TIMEOUT_S)
        await browser.detach_devtools()  # as shard_worker.page.Page.launch does once the page is up
        await bridge.request("load", PAGE_TIMEOUT_S, key="m", url=f"/shards/{SHA}.onnx", platform="wasm")
        yield bridge
    finally:
        await bridge.close()
        if browser is not None:
            await browser.close()
        server.close()


async def test_a_production_page_ignores_a_fault_sent_to_it_past_its_worker(model: Path, shard_dir: Path) -> None:
    inputs = sample_tokens(2, 8, seed=4)
    async with bare_page(shard_dir, faults=False) as bridge:
        result = await bridge.run("m", inputs, PAGE_TIMEOUT_S, fail="sent straight to the page")
        want = run_whole(model, inputs)
        np.testing.assert_allclose(result.outputs["hidden"], want["hidden"], rtol=0, atol=1e-4)
        with pytest.raises(PageError, match="fault injection is disabled in this page"):
            await bridge.request("throw", PAGE_TIMEOUT_S, message="sent straight to the page")


async def test_a_page_with_fault_injection_on_throws_when_told_to(model: Path, shard_dir: Path) -> None:
    inputs = sample_tokens(1, 4, seed=5)
    async with bare_page(shard_dir, faults=True) as bridge:
        with pytest.raises(PageError, match="injected kernel error: told to"):
            await bridge.run("m", inputs, PAGE_TIMEOUT_S, fail="told to")
        with pytest.raises(PageError, match="injected page error: told to"):
            await bridge.request("throw", PAGE_TIMEOUT_S, message="told to")
        result = await bridge.run("m", inputs, PAGE_TIMEOUT_S)  # the page goes on
        np.testing.assert_allclose(result.outputs["hidden"], run_whole(model, inputs)["hidden"], rtol=0, atol=1e-4)
