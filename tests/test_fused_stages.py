"""Consecutive stages one worker serves run in its page with no stream hop between them, and a failure of
the later one hands back that stage's own inputs. In the first two tests the coordinator's side is played
by the test on the streams (assignments, one job, the reply), so what is checked is the worker's contract;
the last goes through the public API, where ``max_connections`` caps the browsers a manager launches.
Real valkey, real ``python -m shard_worker`` processes with headless Chromium and onnxruntime-web,
outputs against native onnxruntime."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from broker.keys import STAGE_GROUP
from broker.messages import (
    Inject,
    InjectReply,
    Message,
    StageFailure,
    StageHop,
    StageResult,
)
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.planning.hosting import wasm_threads
from coordinator.planning.shardset import ShardSet, build_shard_set
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.faults_support import stop_processes, wait_until
from tests.native import run_whole
from tests.onnx_models import residual_mlp, sample_tokens
from tests.worker_support import WAIT_S, assign, now_ms, read_one, start_worker

pytestmark = pytest.mark.browser

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return residual_mlp(tmp_path_factory.mktemp("fused") / "mlp.onnx", layers=6, hidden=16, vocab=50)


@dataclass
class Chain:
    broker: Broker
    shards: ShardSet
    route: tuple[str, ...]
    reply: str
    first: str  # the worker serving stage 0
    second: str  # the worker serving stages 1 and 2

    async def submit(self, inputs: dict[str, np.ndarray], stage: int = 0) -> Message:
        job = StageHop(uuid.uuid4().hex, self.shards.plan.plan_id, stage, self.route, self.reply, inputs, now_ms())
        await self.broker.add(self.route[stage], job)
        return await read_one(self.broker, self.reply)


@asynccontextmanager
async def chain(model: Path, url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Chain]:
    """Three stages: worker ``a`` serves stage 0, worker ``b`` stages 1 and 2."""
    require_browsers("chromium")
    cache = tmp_path / "cache"
    shards = build_shard_set(model, 3, "layer", cache)
    ids = [f"chromium-{namespace}-{name}" for name in ("a", "b")]
    procs = [start_worker(url, namespace, cache, wid) for wid in ids]
    try:
        async with Broker(url, namespace) as broker:

            async def registered() -> bool:
                assert all(p.poll() is None for p in procs), "a worker exited"
                live = {w.worker_id for w in await broker.live_workers(int(now_ms()), 2000)}
                return set(ids) <= live

            await wait_until(registered, WAIT_S, "both workers to register")
            route = tuple(broker.keys.stage(shards.plan.plan_id, i) for i in range(3))
            for index, wid in ((0, ids[0]), (1, ids[1]), (2, ids[1])):
                await assign(broker, shards, route, index, wid)
            yield Chain(broker, shards, route, broker.keys.reply(f"test{namespace}"), ids[0], ids[1])
    finally:
        await asyncio.to_thread(stop_processes, procs)


def native_carry(shards: ShardSet, inputs: dict[str, np.ndarray], stages: int) -> dict[str, np.ndarray]:
    """What the first ``stages`` shards carry on, under native onnxruntime."""
    env: dict[str, Any] = dict(inputs)
    for stage in shards.plan.stages[:stages]:
        sess = ort.InferenceSession(str(shards.path(stage.index)), providers=["CPUExecutionProvider"])
        feeds = {n: env[n] for n in stage.input_names}
        env.update(zip(stage.output_names, sess.run(list(stage.output_names), feeds), strict=True))
        env = {n: env[n] for n in stage.carry_names}
    return env


async def test_two_consecutive_stages_of_one_worker_run_in_its_page_and_match_native(
    model: Path, valkey: Any, namespace: str, tmp_path: Path
) -> None:
    async with chain(model, valkey.url, namespace, tmp_path) as c:
        inputs = sample_tokens(2, 7, seed=11)
        reply = await c.submit(inputs)
        assert isinstance(reply, StageResult), reply
        want = run_whole(model, inputs)["hidden"]
        np.testing.assert_allclose(reply.tensors["hidden"], want, rtol=0, atol=TOLERANCE)
        assert [t.shard_index for t in reply.trace] == [0, 1, 2]
        assert [t.worker_id for t in reply.trace] == [c.first, c.second, c.second]
        assert [t.fused for t in reply.trace] == [False, False, True]
        s1, s2 = reply.trace[1], reply.trace[2]
        assert s1.kernel_ms > 0 and s2.kernel_ms > 0
        assert s1.read_ms > 0 and s1.sent_ms > 0 and s2.read_ms == 0 and s2.queue_ms == 0
        assert s1.page_read_ms <= s2.page_fed_ms <= s2.page_ran_ms <= s2.page_sent_ms
        assert s2.handoff_ms >= s2.result_ms > 0
        assert await c.broker.stream_length(c.route[2]) == 0, "stage 2's stream was used: a hop was paid"
        assert await c.broker.pending_count(c.route[1], STAGE_GROUP) == 0


async def test_a_failure_in_the_later_stage_hands_back_that_stages_inputs(
    model: Path, valkey: Any, namespace: str, tmp_path: Path
) -> None:
    async with chain(model, valkey.url, namespace, tmp_path) as c:
        ack = c.broker.keys.ack(uuid.uuid4().hex)
        await c.broker.add(c.broker.keys.control(c.second), Inject("kernel-error", 1, "i1", ack, shard_index=2))
        armed = await read_one(c.broker, ack)
        assert isinstance(armed, InjectReply) and armed.accepted, armed
        inputs = sample_tokens(1, 6, seed=12)
        failure = await c.submit(inputs)
        assert isinstance(failure, StageFailure), failure
        assert (failure.stage_index, failure.worker_id, failure.attempt) == (2, c.second, 1)
        assert "injected kernel error" in failure.error
        assert [t.shard_index for t in failure.trace] == [0, 1]
        want = native_carry(c.shards, inputs, 2)
        assert sorted(failure.tensors) == sorted(want)
        for name, arr in want.items():
            np.testing.assert_allclose(failure.tensors[name], arr, rtol=0, atol=TOLERANCE)
        assert await c.broker.pending_count(c.route[1], STAGE_GROUP) == 0, "the stage-1 job was not acked"
        # what recovery does next: stage 2 again on its inputs; the armed fault is spent
        result = await c.submit(dict(failure.tensors), stage=2)
        assert isinstance(result, StageResult), result
        np.testing.assert_allclose(result.tensors["hidden"], run_whole(model, inputs)["hidden"], rtol=0, atol=TOLERANCE)


async def test_max_connections_caps_the_browsers_and_consecutive_shards_share_one(model: Path, cache_dir: Path) -> None:
    require_browsers("chromium")
    settings = ManagerSettings(cache_dir=cache_dir, namespace=f"cap{uuid.uuid4().hex[:8]}")
    manager = ModelShardingManager(
        str(model), num_shards=3, browsers=["chromium"], platform="wasm", max_connections=2, settings=settings
    )
    try:
        assert await manager.initialize_sharding(), manager.last_error
        alloc = manager.allocation
        workers = [alloc[i]["worker_id"] for i in range(3)]
        assert workers[0] == workers[1] != workers[2], alloc
        assert "shares shard 0's chromium (max_connections=2)" in alloc[1]["reason"]
        assert {alloc[i]["wasm_threads"] for i in range(3)} == {wasm_threads(os.cpu_count() or 1, 2)}
        inputs = sample_tokens(2, 5, seed=13)
        res = await manager.run_inference_sharded(inputs)
        assert "result" in res, res
        np.testing.assert_allclose(res["result"]["hidden"], run_whole(model, inputs)["hidden"], rtol=0, atol=TOLERANCE)
        comps = [res["metrics"]["component_results"][f"shard_{i}"] for i in range(3)]
        assert [c["worker_id"] for c in comps] == workers
        assert all(c["kernel_ms"] > 0 for c in comps)
    finally:
        await manager.close()
