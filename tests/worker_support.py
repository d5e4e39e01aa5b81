"""Playing the coordinator's side on the streams, for tests of the worker's contract: start a
``python -m shard_worker`` process, assign it stages, read the answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from broker.messages import Assignment, AssignmentReply, Message
from broker.streams import Broker
from coordinator.planning.shardset import ShardSet

WAIT_S = 90.0


def now_ms() -> float:
    return time.time() * 1000.0


def start_worker(url: str, namespace: str, cache_dir: Path, worker_id: str, *flags: str) -> subprocess.Popen[bytes]:
    """``python -m shard_worker`` on Chromium (wasm, one thread) with fault injection and ``flags``."""
    cmd = [sys.executable, "-m", "shard_worker", "--redis", url, "--browser", "chromium", "--platform", "wasm"]
    cmd += ["--namespace", namespace, "--cache-dir", str(cache_dir), "--worker-id", worker_id, "--wasm-threads", "1"]
    cmd += ["--allow-fault-injection", "--log-level", "WARNING", *flags]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def read_one(broker: Broker, stream: str, after: str = "0") -> Message:
    """The next answer on ``stream`` (which is then deleted: one answer at a time on it)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for d in await broker.read(stream, after, count=1, block_ms=1000):
            await broker.delete(stream)  # one answer at a time on this stream
            assert d.message is not None, d.error
            return d.message
    pytest.fail(f"no answer on {stream} within {WAIT_S}s")


async def assign(broker: Broker, shards: ShardSet, route: tuple[str, ...], index: int, worker_id: str) -> None:
    """Tell ``worker_id`` to load shard ``index`` and serve its stage stream, as a coordinator does."""
    stage = shards.plan.stages[index]
    reply = broker.keys.ack(uuid.uuid4().hex)
    a = Assignment(
        uuid.uuid4().hex,
        shards.plan.plan_id,
        index,
        route[index],
        shards.shard_sha256[index],
        stage.input_names,
        stage.carry_names,
        "wasm",
        reply,
        "mlp",
    )
    await broker.add(broker.keys.control(worker_id), a)
    answer = await read_one(broker, reply)
    assert isinstance(answer, AssignmentReply) and answer.ok, answer
