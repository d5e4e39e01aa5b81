"""Real faults injected into real processes: browsers SIGKILLed, workers SIGKILLed or frozen, pages
throwing inside kernels, the broker SIGKILLed and restarted, a coordinator killed mid-request, poison
inputs, stages left without a worker. Every request ends correct (against native onnxruntime) or in
the dead letter with a reason; none is lost, none is returned twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker.ledger import Ledger
from broker.messages import Inject
from broker.streams import Broker
from coordinator.cli.faultlab import FaultTestConfig, inject_fault, run_fault_test
from coordinator.manager import ModelShardingManager
from coordinator.runtime.launcher import LocalWorkers
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.faults_support import (
    arm,
    assert_all_match_native,
    assert_matches_native,
    broker_of,
    start_xshard_worker,
    stop_processes,
    wait_until,
)
from tests.onnx_models import residual_mlp, sample_tokens

pytestmark = pytest.mark.browser

REQUESTS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # big enough that a job is in flight when the fault hits
    return residual_mlp(tmp_path_factory.mktemp("faults") / "mlp.onnx", layers=8, hidden=256, vocab=50)


async def fault_run(model: Path, cache_dir: Path, failure: str, **kw: Any) -> dict[str, Any]:
    """``xshard fault-test``'s run; every request is checked here against native onnxruntime."""
    require_browsers("chromium", "firefox")
    cfg = FaultTestConfig(str(model), ["chromium", "firefox"], REQUESTS, failure, cache_dir=cache_dir, **kw)
    run = await run_fault_test(cfg)
    report = run.report
    assert len(run.requests) == REQUESTS
    assert_all_match_native(model, run.requests)
    assert report["lost"] == 0, report["per_request"]
    assert report["duplicated"] == 0, [r for r in report["per_request"] if r["duplicated"]]
    assert report["correct"] == REQUESTS  # faultlab's own column agrees
    return report


async def test_an_inject_no_worker_answers_times_out_and_leaves_no_answer_stream(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as broker:
        with pytest.raises(TimeoutError, match="nobody-here did not answer"):
            await inject_fault(broker, "nobody-here", "kernel-error", 1, timeout_s=0.5)
        sent = await broker.read(broker.keys.control("nobody-here"), "0", block_ms=100)
        assert len(sent) == 1, sent
        inject = sent[0].message
        assert isinstance(inject, Inject), sent
        assert (inject.kind, inject.count) == ("kernel-error", 1)
        assert inject.inject_id and inject.reply_stream == broker.keys.ack(inject.inject_id)
        assert await broker.scan_keys(broker.keys.ack("*")) == []


async def test_a_worker_started_without_fault_injection_refuses_an_inject(
    cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium")
    workers = LocalWorkers(valkey.url, namespace, cache_dir, heartbeat_s=0.5)  # injection off: the default
    wid = workers.spawn("chromium", "wasm").worker_id
    try:
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, [wid], 60, 2000)
            reply = await inject_fault(broker, wid, "kernel-error", 1)
            assert reply.worker_id == wid and not reply.accepted and reply.reason, reply
            assert await broker.scan_keys(broker.keys.ack("*")) == []
    finally:
        await workers.stop_all()


async def test_job_of_killed_browser_is_recovered_and_completes(model: Path, cache_dir: Path) -> None:
    report = await fault_run(model, cache_dir, "crash")
    assert any(e["failure"] == "browser-lost" and e["success"] for e in report["recovery_events"])


async def test_job_of_killed_worker_is_reclaimed_and_redistributed(model: Path, cache_dir: Path) -> None:
    report = await fault_run(model, cache_dir, "worker-kill")
    # the stage's only worker is gone: its shard is loaded onto another worker
    assert any(e["failure"] == "worker-lost" for e in report["recovery_events"])


async def test_frozen_worker_is_declared_dead_and_its_late_result_does_not_duplicate(
    model: Path, cache_dir: Path
) -> None:
    report = await fault_run(model, cache_dir, "hang")  # each request came back once, correct
    frozen = report["target_worker"]
    assert "SIGSTOP" in report["fault"] and frozen in report["fault"]
    declared = [e for e in report["recovery_events"] if e["failure"] == "worker-lost" and e["worker_id"] == frozen]
    assert declared, report["recovery_events"]  # its heartbeat lapsed: the coordinator declared it dead


async def test_page_throwing_in_a_kernel_is_retried(model: Path, cache_dir: Path) -> None:
    report = await fault_run(model, cache_dir, "kernel-error")
    events = report["recovery_events"]
    assert len(events) == 1 and events[0]["failure"] == "kernel" and events[0]["success"]
    assert "injected kernel error" in events[0]["error"]


async def test_broker_killed_and_restarted_loses_no_accepted_request(model: Path, cache_dir: Path) -> None:
    report = await fault_run(model, cache_dir, "broker-restart")
    assert "SIGKILL valkey-server" in report["fault"]


async def test_poison_input_lands_in_the_dead_letter_and_replays_on_a_fixed_pool(model: Path, cache_dir: Path) -> None:
    require_browsers("chromium", "firefox")
    manager = ModelShardingManager(
        str(model),
        num_shards=2,
        browsers=["chromium", "firefox"],
        fault_tolerance_level="high",
        settings=ManagerSettings(cache_dir=cache_dir, allow_fault_injection=True),
    )
    assert await manager.initialize_sharding(), manager.last_error
    try:
        async with broker_of(manager) as broker:
            workers = sorted(manager.fleet.live)
            for wid in workers:  # every page throws: the input poisons every browser
                await arm(broker, wid, "kernel-error", 1000)
            inputs = sample_tokens(2, 9)
            res = await manager.run_inference_sharded(inputs, max_retries=8)  # room to climb the whole ladder
            assert res.get("error_kind") == "dead_letter", res
            letters = await manager.dead_letters()
            assert len(letters) == 1
            entry_id, dead, _ = letters[0]
            assert dead is not None and dead.request_id == res["request_id"]
            assert "injected kernel error" in dead.error and dead.reason
            assert len(dead.workers_tried) >= 2
            for wid in workers:  # the pool is fixed
                await arm(broker, wid, "kernel-error", 0)
            replayed = await manager.replay([entry_id])
            out = replayed[entry_id]
            assert "result" in out, out
            assert_matches_native(model, inputs, out["result"])
            assert await manager.dead_letters() == []
    finally:
        await manager.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from broker.ledger import Ledger
    from broker.streams import Broker
    from coordinator.manager import ModelShardingManager
    from coordinator.settings import ManagerSettings
    from tests.onnx_models import sample_tokens

    async def main(model, url, ns, cache, coord):
        m = ModelShardingManager(model, num_shards=2, browsers=["chromium", "firefox"], redis_url=url,
                                 settings=ManagerSettings(cache_dir=Path(cache), namespace=ns, coordinator_id=coord))
        assert await m.initialize_sharding(), m.last_error
        tasks = [asyncio.ensure_future(m.run_inference_sharded(sample_tokens(1, 5 + i, seed=i))) for i in range(8)]
        async with Broker(url, ns) as broker:  # its own connection: accepted requests are in the ledger
            ledger = Ledger(broker)
            while len(await ledger.inflight(coord)) < 8:
                await asyncio.sleep(0.02)
        print("SUBMITTED", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def test_coordinator_killed_mid_request_resumes_its_requests(
    model: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    require_browsers("chromium", "firefox")
    workers = LocalWorkers(valkey.url, namespace, cache_dir, heartbeat_s=0.5)
    ids = [workers.spawn(b, "wasm").worker_id for b in ("chromium", "firefox")]
    coord = f"coord-{namespace}"
    try:
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, ids, 60, 2000)
            stage1 = workers.workers[ids[1]].process
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CHILD,
                str(model),
                valkey.url,
                namespace,
                str(cache_dir),
                coord,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            assert child.stdout is not None
            line = b""
            while b"SUBMITTED" not in line:
                line = await asyncio.wait_for(child.stdout.readline(), 120)
                assert line, "the coordinator process exited early"
            stage1.send_signal(signal.SIGSTOP)  # hold the pipeline so requests stay in flight
            child.kill()
            await child.wait()
            ledger = Ledger(broker)
            inflight = await ledger.inflight(coord)
            inputs = {rid: (await ledger.state(rid)).job.tensors for rid in inflight}  # type: ignore[union-attr]
            stage1.send_signal(signal.SIGCONT)
            assert inflight, "every request finished before the kill; nothing to resume"
            manager = ModelShardingManager(
                str(model),
                num_shards=2,
                browsers=["chromium", "firefox"],
                redis_url=valkey.url,
                settings=ManagerSettings(cache_dir=cache_dir, namespace=namespace, coordinator_id=coord),
            )
            assert await manager.initialize_sharding(), manager.last_error
            try:
                resumed = await manager.resume()
                assert set(resumed) <= set(inflight)  # some may have finished since the new reader started
                for rid in inflight:
                    res = await manager.wait_for(rid)
                    assert "result" in res, res
                    assert_matches_native(model, {k: np.array(v) for k, v in inputs[rid].items()}, res["result"])
                assert await ledger.inflight(coord) == []
            finally:
                await manager.close()
    finally:
        await workers.stop_all()


async def test_sixty_requests_survive_a_killed_browser_a_killed_worker_and_a_frozen_one(
    model: Path, cache_dir: Path, valkey: Any, namespace: str
) -> None:
    """Three workers started as `xshard worker` processes, a manager given redis_url, 60 requests in
    flight; one browser SIGKILLed, one worker SIGKILLed, another frozen until the coordinator declares
    it dead, then resumed."""
    require_browsers("chromium", "firefox")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for browser in ("chromium", "firefox", "chromium"):
        wid = f"{browser}-{namespace}-{len(procs)}"
        procs[wid] = start_xshard_worker(valkey.url, browser, namespace, cache_dir, wid)
    manager = ModelShardingManager(
        str(model),
        num_shards=2,
        browsers=["chromium", "firefox"],
        redis_url=valkey.url,
        settings=ManagerSettings(cache_dir=cache_dir, namespace=namespace, worker_wait_s=90),
    )
    try:
        assert await manager.initialize_sharding(), manager.last_error
        crashed, killed, frozen = list(procs)
        async with Broker(valkey.url, namespace) as broker:
            crashed_info = await broker.worker_info(crashed)
        assert crashed_info is not None and crashed_info.browser_pid > 0, crashed_info
        inputs = [sample_tokens(1, 6 + i % 20, seed=i) for i in range(60)]

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(i * 0.03)
            return await manager.run_inference_sharded(inputs[i])

        tasks = [asyncio.ensure_future(one(i)) for i in range(60)]
        await asyncio.sleep(0.3)  # the faults are spaced while requests are being submitted
        os.kill(crashed_info.browser_pid, signal.SIGKILL)
        await asyncio.sleep(0.3)
        procs[killed].kill()
        await asyncio.sleep(0.3)
        procs[frozen].send_signal(signal.SIGSTOP)

        async def declared_dead() -> bool:
            return frozen not in manager.fleet.live

        await wait_until(declared_dead, 60, f"the coordinator to declare the frozen {frozen} dead")
        procs[frozen].send_signal(signal.SIGCONT)
        results = await asyncio.gather(*tasks)
        for inp, res in zip(inputs, results, strict=True):
            assert "result" in res, res
            assert_matches_native(model, inp, res["result"])
        assert len({r["metrics"]["request_id"] for r in results}) == 60
    finally:
        await manager.close()
        stop_processes(procs.values())
