"""``xshard fault-test``: real faults injected into real processes while requests flow, and a report
per request: correct (against native onnxruntime on the whole model), lost, duplicated, recovery time.

Failure types: ``crash`` SIGKILLs a browser; ``hang`` SIGSTOPs a worker for twice the heartbeat
timeout, then SIGCONTs it; ``kernel-error`` makes a page throw inside its next kernel; ``worker-kill``
SIGKILLs a worker process; ``broker-restart`` SIGKILLs the broker (AOF on, fsync always) and restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from broker.embedded import EmbeddedValkey
from broker.keys import STAGE_GROUP
from broker.messages import ExecutionEvent, Inject
from broker.streams import Broker

from .launcher import LocalWorkers
from .manager import ModelShardingManager
from .settings import ManagerSettings

log = logging.getLogger(__name__)

FAILURE_TYPES = ("crash", "hang", "kernel-error", "worker-kill", "broker-restart")
TOLERANCE = 1e-4


@dataclass
class FaultTestConfig:
    model: str
    browsers: list[str]
    requests: int
    failure_type: str
    recovery_strategy: str = "progressive"
    fault_tolerance_level: str = "medium"
    shards: int = 2
    workers_per_stage: int = 1
    spare_workers: int = 1
    target_stage: int = -1  # the stage whose worker gets the fault; -1: the last
    cache_dir: Path | None = None
    inputs: Callable[[int], dict[str, np.ndarray]] | None = None
    spacing_s: float = 0.02
    settings: dict[str, Any] = field(default_factory=dict)


async def _fire(cfg: FaultTestConfig, broker: Broker, valkey: EmbeddedValkey, worker_id: str, pid: int,
                browser_pid: int, heartbeat_timeout_s: float) -> str:  # fmt: skip
    kind = cfg.failure_type
    if kind == "crash":
        os.kill(browser_pid, signal.SIGKILL)
        return f"SIGKILL browser pid {browser_pid} of {worker_id}"
    if kind == "worker-kill":
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL worker pid {pid} ({worker_id})"
    if kind == "kernel-error":
        await broker.add(broker.keys.control(worker_id), Inject("kernel-error", 1))
        return f"page of {worker_id} throws in its next kernel"
    if kind == "hang":
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(2 * heartbeat_timeout_s)
        os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP worker pid {pid} ({worker_id}) for {2 * heartbeat_timeout_s:.1f}s, then SIGCONT"
    if kind == "broker-restart":
        await asyncio.to_thread(valkey.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(valkey.start)
        return f"SIGKILL valkey-server, restarted on {valkey.url} after 0.5s"
    raise ValueError(f"failure type must be one of {FAILURE_TYPES}, got {kind!r}")


async def run_fault_test(cfg: FaultTestConfig) -> dict[str, Any]:
    if cfg.failure_type not in FAILURE_TYPES:
        raise ValueError(f"failure type must be one of {', '.join(FAILURE_TYPES)}, got {cfg.failure_type!r}")
    cache_dir = cfg.cache_dir or Path(tempfile.mkdtemp(prefix="xshard-faulttest-"))
    namespace = f"ft{int(time.time())}"
    options: dict[str, Any] = {"request_timeout_s": 120.0, **cfg.settings}
    settings = ManagerSettings.from_env(cache_dir=cache_dir, namespace=namespace, **options)
    valkey = EmbeddedValkey(appendonly=True)
    await valkey.__aenter__()
    workers = LocalWorkers(valkey.url, namespace, cache_dir, settings.heartbeat_s)
    manager: ModelShardingManager | None = None
    try:
        count = cfg.shards * cfg.workers_per_stage
        ids = [workers.spawn(cfg.browsers[i % len(cfg.browsers)], "auto").worker_id for i in range(count)]
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, ids, settings.worker_wait_s, settings.heartbeat_max_age_ms)
            manager = ModelShardingManager(
                cfg.model, num_shards=cfg.shards, browsers=cfg.browsers, redis_url=valkey.url,
                fault_tolerance_level=cfg.fault_tolerance_level, recovery_strategy=cfg.recovery_strategy,
                settings=settings,
            )  # fmt: skip
            if not await manager.initialize_sharding():
                raise RuntimeError(f"initialize_sharding failed: {manager.last_error}")
            # spares join after the plan is assigned: they hold no shard until recovery needs them
            spares = [workers.spawn(cfg.browsers[i % len(cfg.browsers)], "auto").worker_id
                      for i in range(cfg.spare_workers)]  # fmt: skip
            await workers.wait_registered(broker, spares, settings.worker_wait_s, settings.heartbeat_max_age_ms)
            return await _drive(cfg, manager, broker, valkey, workers)
    finally:
        log.info("fault-test: closing")
        if manager is not None:
            await manager.close()
        log.info("fault-test: stopping workers")
        await workers.stop_all()
        await valkey.__aexit__(None, None, None)
        log.info("fault-test: done")


async def _drive(
    cfg: FaultTestConfig, manager: ModelShardingManager, broker: Broker, valkey: EmbeddedValkey,
    workers: LocalWorkers,
) -> dict[str, Any]:  # fmt: skip
    assert manager.shards is not None and manager.model is not None
    make_inputs = cfg.inputs or _token_inputs(manager)
    stage = cfg.target_stage % cfg.shards
    target = manager.fleet.serving[stage][0]
    info = await broker.worker_info(target)
    pid, browser_pid = int(info["pid"]), int(info["browser_pid"])
    sess = ort.InferenceSession(str(manager.model.onnx_path), providers=["CPUExecutionProvider"])
    inputs = [make_inputs(i) for i in range(cfg.requests)]
    await manager.run_inference_sharded(inputs[0])  # warm: every page has compiled its session
    finished: dict[int, float] = {}

    async def one(i: int) -> dict[str, Any]:
        await asyncio.sleep(i * cfg.spacing_s)
        res = await manager.run_inference_sharded(inputs[i])
        finished[i] = time.monotonic()
        return res

    tasks = [asyncio.ensure_future(one(i)) for i in range(cfg.requests)]
    await asyncio.sleep(min(cfg.requests * cfg.spacing_s / 4, 1.0))
    await _until_holding(broker, manager.route[stage], target, deadline_s=cfg.requests * cfg.spacing_s / 2)
    fault_s = time.monotonic()
    log.info("fault-test: firing %s at %s", cfg.failure_type, target)
    what = await _fire(cfg, broker, valkey, target, pid, browser_pid, manager.settings.heartbeat_max_age_ms / 1000)
    log.info("fault-test: fired (%s); waiting for %d requests", what, len(tasks))
    await asyncio.wait(tasks, timeout=manager.settings.request_timeout_s + 60)
    log.info("fault-test: %d of %d requests ended", sum(t.done() for t in tasks), len(tasks))
    lost: dict[str, Any] = {"error": "no outcome", "error_kind": "lost"}
    results: list[dict[str, Any]] = [t.result() if t.done() and not t.cancelled() else lost for t in tasks]
    for t in tasks:
        t.cancel()
    events = await broker.read_events()
    delivered = manager._tracker.deliveries if manager._tracker else Counter()
    finals: Counter[str] = Counter(
        e.request_id for e in events
        if isinstance(e, ExecutionEvent) and e.outcome == "success" and e.shard_index == cfg.shards - 1
    )  # fmt: skip
    recovered = {e["request_id"] for e in manager.metrics.recovery_events}
    rows = []
    for i, (inp, res) in enumerate(zip(inputs, results, strict=True)):
        want = sess.run(None, inp)
        rid = res.get("request_id") or res.get("metrics", {}).get("request_id")
        row: dict[str, Any] = {"index": i, "request_id": rid}
        if "result" in res:
            got = list(res["result"].values())
            diff = max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want, strict=True))
            row.update(outcome="result", correct=diff <= TOLERANCE, max_abs_diff=diff)
        else:
            row.update(outcome="dead_letter" if res.get("error_kind") == "dead_letter" else "lost",
                       correct=False, error=res.get("error"))  # fmt: skip
        # returned twice = a second result reached the coordinator; a stage run twice whose late result
        # the hand-off script dropped (reclaimed job, request already done) is counted apart
        row["duplicated"] = delivered.get(rid or "", 0) > 1
        row["reexecuted"] = finals.get(rid or "", 0) > 1
        row["recovered"] = rid in recovered
        row["recovery_ms"] = round((finished[i] - fault_s) * 1000, 1) if rid in recovered else None
        rows.append(row)
    times = [r["recovery_ms"] for r in rows if r["recovery_ms"] is not None]
    return {
        "failure_type": cfg.failure_type, "fault": what, "recovery_strategy": cfg.recovery_strategy,
        "fault_tolerance_level": cfg.fault_tolerance_level, "model": cfg.model, "browsers": cfg.browsers,
        "requests": cfg.requests,
        "correct": sum(r["correct"] for r in rows),
        "lost": sum(r["outcome"] == "lost" for r in rows),
        "dead_lettered": sum(r["outcome"] == "dead_letter" for r in rows),
        "duplicated": sum(r["duplicated"] for r in rows),
        "reexecuted_final_stage": sum(r["reexecuted"] for r in rows),
        "recovered": len(times),
        "recovery_ms_p50": float(np.percentile(times, 50)) if times else None,
        "recovery_ms_max": max(times) if times else None,
        "recovery_events": manager.metrics.recovery_events,
        "per_request": rows,
    }  # fmt: skip


async def _until_holding(broker: Broker, stream: str, worker_id: str, deadline_s: float) -> None:
    """Wait (a little) until ``worker_id`` holds a job, so that the fault hits one in flight."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if await broker.pending_for(stream, STAGE_GROUP, worker_id):
            return
        await asyncio.sleep(0.002)


def _token_inputs(manager: ModelShardingManager) -> Callable[[int], dict[str, np.ndarray]]:
    assert manager.shards is not None
    specs = manager.shards.profile.inputs
    vocab = min(manager.shards.profile.vocab_limits.values(), default=1000)

    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(i)
        seq = int(rng.integers(8, 32))
        out: dict[str, np.ndarray] = {}
        for spec in specs:
            if spec.name == "attention_mask":
                out[spec.name] = np.ones((1, seq), dtype=spec.dtype)
            elif np.dtype(spec.dtype).kind in "iu":
                out[spec.name] = rng.integers(0, vocab, (1, seq)).astype(spec.dtype)
            else:
                shape = [d if isinstance(d, int) else (1 if k == 0 else seq) for k, d in enumerate(spec.shape)]
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        return out

    return make


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))
