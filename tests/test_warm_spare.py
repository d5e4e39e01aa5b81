"""A worker started with ``--warm-spare`` keeps a second browser up; when its browser is killed, the spare
(already running before the crash) takes over, the shard is loaded into it, and the next job runs there
correctly. Real valkey, a real ``python -m shard_worker`` process, real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.messages import StageHop, StageResult
from broker.registry import WorkerState
from broker.streams import Broker
from coordinator.planning.shardset import build_shard_set
from tests.conftest import require_browsers
from tests.faults_support import stop_processes, wait_until
from tests.native import run_whole
from tests.onnx_models import residual_mlp, sample_tokens
from tests.worker_support import WAIT_S, assign, now_ms, read_one, start_worker

pytestmark = pytest.mark.browser


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


async def test_a_killed_browser_is_replaced_by_the_warm_spare_that_was_already_up(
    valkey: Any, namespace: str, tmp_path: Path
) -> None:
    require_browsers("chromium")
    model = residual_mlp(tmp_path / "mlp.onnx", layers=2, hidden=16, vocab=50)
    cache = tmp_path / "cache"
    shards = build_shard_set(model, 1, "layer", cache)
    wid = f"chromium-{namespace}-spare"
    proc = start_worker(valkey.url, namespace, cache, wid, "--warm-spare")
    try:
        async with Broker(valkey.url, namespace) as broker:

            async def ready() -> bool:
                assert proc.poll() is None, f"worker exited with {proc.returncode}"
                info = await broker.worker_info(wid)
                return info is not None and info.state is WorkerState.READY

            async def spare_up() -> bool:
                return len(children(proc.pid)) >= 2  # its browser and the spare

            await wait_until(ready, WAIT_S, "the worker to register")
            await wait_until(spare_up, WAIT_S, "the spare browser to start")
            info = await broker.worker_info(wid)
            assert info is not None
            before = children(proc.pid)
            route = (broker.keys.stage(shards.plan.plan_id, 0),)
            await assign(broker, shards, route, 0, wid)
            os.kill(info.browser_pid, signal.SIGKILL)

            async def replaced() -> bool:
                now = await broker.worker_info(wid)
                return now is not None and now.browser_pid != info.browser_pid and now.state is WorkerState.READY

            await wait_until(replaced, WAIT_S, "the browser to be replaced")
            after = await broker.worker_info(wid)
            assert after is not None and after.browser_pid in before, (after.browser_pid, before)
            inputs = sample_tokens(2, 5, seed=21)
            reply_stream = broker.keys.reply(f"test{namespace}")
            job = StageHop(uuid.uuid4().hex, shards.plan.plan_id, 0, route, reply_stream, inputs, now_ms())
            await broker.add(route[0], job)
            result = await read_one(broker, reply_stream)
            assert isinstance(result, StageResult), result
            np.testing.assert_allclose(result.tensors["hidden"], run_whole(model, inputs)["hidden"], atol=1e-4, rtol=0)
    finally:
        await asyncio.to_thread(stop_processes, [proc])
