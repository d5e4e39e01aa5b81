"""``xshard fault-test``: real faults injected into real processes while requests flow, and a report
per request: correct (against native onnxruntime on the whole model), lost, duplicated, recovery time.

Failure types: ``crash`` SIGKILLs a browser; ``hang`` SIGSTOPs a worker for twice the heartbeat
timeout, then SIGCONTs it; ``kernel-error`` makes a page throw inside its next kernel; ``worker-kill``
SIGKILLs a worker process; ``broker-restart`` SIGKILLs the broker (AOF on, fsync always) and restarts it.

``run_fault_test`` returns a ``FaultTestRun``: the JSON-ready report (with faultlab's own correctness
column, for the CLI) and each request's inputs and outputs, for callers that check them themselves.
``inject_fault`` arms a fault in a worker started with fault injection enabled and waits for its answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from broker.embedded import EmbeddedValkey
from broker.keys import STAGE_GROUP
from broker.messages import ExecutionEvent, Inject, InjectReply
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.runtime.launcher import LocalWorkers
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

FAILURE_TYPES = ("crash", "hang", "kernel-error", "worker-kill", "broker-restart")
TOLERANCE = 1e-4
INJECT_TIMEOUT_S = 10.0
INJECT_POLL_MS = 500


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


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request of a fault test as its caller saw it: what went in and what came back, so that a
    caller can check the outputs itself."""

    index: int
    request_id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None  # None: no result (dead-lettered or lost)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FaultTestRun:
    """The report (JSON-ready, with faultlab's own correctness column) and every request's record."""

    report: dict[str, Any]
    requests: tuple[RequestRecord, ...]


@dataclass(frozen=True, slots=True)
class _Target:
    worker_id: str
    stage_index: int
    pid: int
    browser_pid: int


@dataclass(frozen=True, slots=True)
class _Flow:
    results: list[dict[str, Any]]
    finished_s: dict[int, float]  # request index -> monotonic time its outcome came back
    fault_s: float
    fault: str


async def inject_fault(
    broker: Broker, worker_id: str, kind: str, count: int, timeout_s: float = INJECT_TIMEOUT_S
) -> InjectReply:
    """Arm a fault in one worker (``Inject`` on its control stream) and wait for its answer.

    Returns the ``InjectReply``: ``accepted`` is False, with the reason, when the worker was started
    without fault injection enabled. Raises TimeoutError when no answer comes within ``timeout_s``.
    """
    inject_id = uuid.uuid4().hex
    ack = broker.keys.ack(inject_id)
    await broker.add(broker.keys.control(worker_id), Inject(kind, count, inject_id=inject_id, reply_stream=ack))
    deadline = time.monotonic() + timeout_s
    last_id = "0"
    try:
        while (left_s := deadline - time.monotonic()) > 0:
            block_ms = max(1, min(INJECT_POLL_MS, int(left_s * 1000)))
            for d in await broker.read(ack, last_id, block_ms=block_ms):
                last_id = d.entry_id
                if isinstance(d.message, InjectReply) and d.message.inject_id == inject_id:
                    return d.message
                log.warning("inject %s: ignoring entry %s on %s: %s", inject_id, d.entry_id, ack, d.error or d.message)
    finally:
        await broker.delete(ack)
    raise TimeoutError(
        f"worker {worker_id} did not answer inject {kind!r} x{count} (id {inject_id}) within {timeout_s}s: "
        "is it running, and does it answer injections?"
    )


async def _fire(
    cfg: FaultTestConfig, broker: Broker, valkey: EmbeddedValkey, target: _Target, heartbeat_timeout_s: float
) -> str:
    kind, wid = cfg.failure_type, target.worker_id
    if kind == "crash":
        os.kill(target.browser_pid, signal.SIGKILL)
        return f"SIGKILL browser pid {target.browser_pid} of {wid}"
    if kind == "worker-kill":
        os.kill(target.pid, signal.SIGKILL)
        return f"SIGKILL worker pid {target.pid} ({wid})"
    if kind == "kernel-error":
        reply = await inject_fault(broker, wid, "kernel-error", 1)
        if not reply.accepted:
            raise RuntimeError(f"worker {wid} refused the injected kernel error: {reply.reason}")
        return f"page of {wid} throws in its next kernel"
    if kind == "hang":
        os.kill(target.pid, signal.SIGSTOP)
        await asyncio.sleep(2 * heartbeat_timeout_s)  # the fault is a freeze of this length
        os.kill(target.pid, signal.SIGCONT)
        return f"SIGSTOP worker pid {target.pid} ({wid}) for {2 * heartbeat_timeout_s:.1f}s, then SIGCONT"
    if kind == "broker-restart":
        await asyncio.to_thread(valkey.kill)
        await asyncio.sleep(0.5)  # the outage is this long
        await asyncio.to_thread(valkey.start)
        return f"SIGKILL valkey-server, restarted on {valkey.url} after 0.5s"
    raise ValueError(f"failure type must be one of {FAILURE_TYPES}, got {kind!r}")


async def run_fault_test(cfg: FaultTestConfig) -> FaultTestRun:
    """Start a broker and workers (fault injection enabled), run ``cfg.requests`` requests through a
    manager, fire the fault at a worker holding a job, and report each request's outcome."""
    if cfg.failure_type not in FAILURE_TYPES:
        raise ValueError(f"failure type must be one of {', '.join(FAILURE_TYPES)}, got {cfg.failure_type!r}")
    cache_dir = cfg.cache_dir or Path(tempfile.mkdtemp(prefix="xshard-faulttest-"))
    namespace = f"ft{int(time.time())}"
    options: dict[str, Any] = {"request_timeout_s": 120.0, **cfg.settings}
    settings = ManagerSettings.from_env(cache_dir=cache_dir, namespace=namespace, allow_fault_injection=True, **options)
    valkey = EmbeddedValkey(appendonly=True)
    await valkey.__aenter__()
    workers = LocalWorkers(
        valkey.url, namespace, cache_dir, settings.heartbeat_s, allow_fault_injection=settings.allow_fault_injection
    )
    manager: ModelShardingManager | None = None
    try:
        count = cfg.shards * cfg.workers_per_stage
        ids = [workers.spawn(cfg.browsers[i % len(cfg.browsers)], "auto").worker_id for i in range(count)]
        async with Broker(valkey.url, namespace) as broker:
            await workers.wait_registered(broker, ids, settings.worker_wait_s, settings.heartbeat_max_age_ms)
            manager = ModelShardingManager(
                cfg.model,
                num_shards=cfg.shards,
                browsers=cfg.browsers,
                redis_url=valkey.url,
                fault_tolerance_level=cfg.fault_tolerance_level,
                recovery_strategy=cfg.recovery_strategy,
                settings=settings,
            )
            if not await manager.initialize_sharding():
                raise RuntimeError(f"initialize_sharding failed: {manager.last_error}")
            # spares join after the plan is assigned: they hold no shard until recovery needs them
            spares = [
                workers.spawn(cfg.browsers[i % len(cfg.browsers)], "auto").worker_id for i in range(cfg.spare_workers)
            ]
            await workers.wait_registered(broker, spares, settings.worker_wait_s, settings.heartbeat_max_age_ms)
            return await _drive(cfg, manager, broker, valkey)
    finally:
        log.info("fault-test: closing")
        if manager is not None:
            await manager.close()
        log.info("fault-test: stopping workers")
        await workers.stop_all()
        await valkey.__aexit__(None, None, None)
        log.info("fault-test: done")


async def _drive(
    cfg: FaultTestConfig, manager: ModelShardingManager, broker: Broker, valkey: EmbeddedValkey
) -> FaultTestRun:
    assert manager.shards is not None and manager.model is not None
    make_inputs = cfg.inputs or _token_inputs(manager)
    target = await _pick_target(cfg, manager, broker)
    inputs = [make_inputs(i) for i in range(cfg.requests)]
    await manager.run_inference_sharded(inputs[0])  # warm: every page has compiled its session
    flow = await _flow(cfg, manager, broker, valkey, target, inputs)
    records = tuple(_record(i, inp, res) for i, (inp, res) in enumerate(zip(inputs, flow.results, strict=True)))
    rows = await _grade(cfg, manager, broker, flow, records)
    times = [r["recovery_ms"] for r in rows if r["recovery_ms"] is not None]
    report = {
        "failure_type": cfg.failure_type,
        "fault": flow.fault,
        "target_worker": target.worker_id,
        "target_stage": target.stage_index,
        "recovery_strategy": cfg.recovery_strategy,
        "fault_tolerance_level": cfg.fault_tolerance_level,
        "model": cfg.model,
        "browsers": cfg.browsers,
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
    }
    return FaultTestRun(report, records)


async def _pick_target(cfg: FaultTestConfig, manager: ModelShardingManager, broker: Broker) -> _Target:
    """The first worker serving the target stage, with the pids a signal needs."""
    stage = cfg.target_stage % cfg.shards
    worker_id = manager.fleet.serving[stage][0]
    info = await broker.worker_info(worker_id)
    if info is None:
        raise RuntimeError(f"worker {worker_id} serves stage {stage} but is not registered")
    return _Target(worker_id, stage, info.pid, info.browser_pid)


async def _flow(
    cfg: FaultTestConfig,
    manager: ModelShardingManager,
    broker: Broker,
    valkey: EmbeddedValkey,
    target: _Target,
    inputs: list[dict[str, np.ndarray]],
) -> _Flow:
    """Requests spaced ``cfg.spacing_s`` apart; the fault fired once the target holds a job."""
    finished: dict[int, float] = {}

    async def one(i: int) -> dict[str, Any]:
        await asyncio.sleep(i * cfg.spacing_s)
        res = await manager.run_inference_sharded(inputs[i])
        finished[i] = time.monotonic()
        return res

    tasks = [asyncio.ensure_future(one(i)) for i in range(cfg.requests)]
    await asyncio.sleep(min(cfg.requests * cfg.spacing_s / 4, 1.0))  # let requests fill the pipeline
    stream = manager.route[target.stage_index]
    await _until_holding(broker, stream, target.worker_id, deadline_s=cfg.requests * cfg.spacing_s / 2)
    fault_s = time.monotonic()
    log.info("fault-test: firing %s at %s", cfg.failure_type, target.worker_id)
    what = await _fire(cfg, broker, valkey, target, manager.settings.heartbeat_max_age_ms / 1000)
    log.info("fault-test: fired (%s); waiting for %d requests", what, len(tasks))
    await asyncio.wait(tasks, timeout=manager.settings.request_timeout_s + 60)
    log.info("fault-test: %d of %d requests ended", sum(t.done() for t in tasks), len(tasks))
    lost: dict[str, Any] = {"error": "no outcome", "error_kind": "lost"}
    results = [t.result() if t.done() and not t.cancelled() else lost for t in tasks]
    for t in tasks:
        t.cancel()
    return _Flow(results, finished, fault_s, what)


def _record(index: int, inputs: dict[str, np.ndarray], res: dict[str, Any]) -> RequestRecord:
    rid = res.get("request_id") or res.get("metrics", {}).get("request_id")
    outputs = dict(res["result"]) if "result" in res else None
    return RequestRecord(index, rid, inputs, outputs, None if outputs is not None else str(res.get("error")))


async def _grade(
    cfg: FaultTestConfig,
    manager: ModelShardingManager,
    broker: Broker,
    flow: _Flow,
    records: tuple[RequestRecord, ...],
) -> list[dict[str, Any]]:
    """One row per request: correct against native onnxruntime on the whole model, duplicated, recovered."""
    assert manager.model is not None
    sess = ort.InferenceSession(str(manager.model.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    events = await broker.read_events()
    tracker = manager.tracker
    finals: Counter[str] = Counter(
        e.request_id
        for e in events
        if isinstance(e, ExecutionEvent) and e.outcome == "success" and e.shard_index == cfg.shards - 1
    )
    recovered = {e["request_id"] for e in manager.metrics.recovery_events}
    rows = []
    for rec, res in zip(records, flow.results, strict=True):
        rid = rec.request_id
        row: dict[str, Any] = {"index": rec.index, "request_id": rid}
        if rec.outputs is not None:
            diff = _max_abs_diff(rec.outputs, dict(zip(names, sess.run(names, rec.inputs), strict=True)))
            row.update(outcome="result", correct=diff <= TOLERANCE, max_abs_diff=diff)
        else:
            kind = "dead_letter" if res.get("error_kind") == "dead_letter" else "lost"
            row.update(outcome=kind, correct=False, error=rec.error)
        # returned twice = a second result reached the coordinator; a stage run twice whose late result
        # the hand-off script dropped (reclaimed job, request already done) is counted apart
        row["duplicated"] = tracker is not None and tracker.deliveries(rid or "") > 1
        row["reexecuted"] = finals.get(rid or "", 0) > 1
        row["recovered"] = rid in recovered
        done_s = flow.finished_s.get(rec.index)
        recovered_ms = round((done_s - flow.fault_s) * 1000, 1) if rid in recovered and done_s is not None else None
        row["recovery_ms"] = recovered_ms
        rows.append(row)
    return rows


def _max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    if set(got) != set(want):
        return float("inf")
    return max(float(np.abs(got[n].astype(np.float64) - want[n].astype(np.float64)).max()) for n in want)


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
