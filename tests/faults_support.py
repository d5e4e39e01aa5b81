"""What the fault tests share: waiting for an observable condition instead of sleeping, a test's own
connection to a manager's broker, arming an injected fault and checking that the worker accepted it,
outputs checked against native onnxruntime on the whole model, and the command line of an
``xshard worker`` process started with fault injection enabled."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import Popen

import numpy as np
import pytest

from broker.streams import Broker
from coordinator.cli.faultlab import RequestRecord, inject_fault
from coordinator.manager import ModelShardingManager
from tests.native import max_diff_unmasked, run_whole

TOLERANCE = 1e-4
POLL_S = 0.05


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(POLL_S)


@asynccontextmanager
async def broker_of(manager: ModelShardingManager) -> AsyncIterator[Broker]:
    """The test's own connection to the broker the manager uses (its URL and namespace)."""
    url = manager.broker_url
    assert url is not None, "the manager is not connected: initialize_sharding() first"
    async with Broker(url, manager.settings.namespace) as broker:
        yield broker


async def arm(broker: Broker, worker_id: str, kind: str, count: int) -> None:
    """Inject a fault and return once the worker has answered that it is armed."""
    reply = await inject_fault(broker, worker_id, kind, count)
    assert reply.worker_id == worker_id, reply
    assert reply.accepted, f"worker {worker_id} refused {kind} x{count}: {reply.reason}"


def assert_matches_native(model: Path, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    """Every output of the whole model under native onnxruntime, matched within ``TOLERANCE``."""
    want = run_whole(model, dict(inputs))
    missing = sorted(set(want) - set(outputs))
    assert not missing, f"outputs missing: {missing} (got {sorted(outputs)})"
    for name, expected in want.items():
        diff = max_diff_unmasked(np.asarray(outputs[name]), expected, None)
        assert diff <= TOLERANCE, f"output {name}: max abs diff {diff} > {TOLERANCE}"


def assert_all_match_native(model: Path, records: Sequence[RequestRecord]) -> None:
    """Each request came back once, with its own id, and correct against native onnxruntime."""
    for rec in records:
        assert rec.outputs is not None, f"request {rec.index} ({rec.request_id}) has no result: {rec.error}"
        assert_matches_native(model, rec.inputs, rec.outputs)
    ids = [rec.request_id for rec in records]
    assert None not in ids and len(set(ids)) == len(ids), ids


def start_xshard_worker(url: str, browser: str, namespace: str, cache_dir: Path, worker_id: str) -> Popen[bytes]:
    """``xshard worker`` as a user starts it, with fault injection enabled (tests inject faults)."""
    cmd = [sys.executable, "-m", "coordinator.cli", "worker", "--redis", url, "--browser", browser]
    cmd += ["--namespace", namespace, "--cache-dir", str(cache_dir), "--worker-id", worker_id]
    cmd += ["--log-level", "WARNING", "--allow-fault-injection"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    logs = os.environ.get("XSHARD_TEST_LOG_DIR")  # set it to keep each worker's log there (when debugging)
    if not logs:
        return Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    with open(Path(logs) / f"{worker_id}.log", "ab") as out:
        return Popen(cmd, stdout=out, stderr=out, env=env)


def stop_processes(procs: Iterable[Popen[bytes]], timeout_s: float = 15.0) -> None:
    """Resume (a frozen one), terminate, and kill what has not exited after ``timeout_s``."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
