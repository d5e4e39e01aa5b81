"""The caller's side of the front door: enqueue an inference job, fetch its outcome by job id, list jobs.

::

    job = await enqueue_inference(redis_url, model="model.onnx", inputs={"input_ids": ids}, shards=2)
    out = await job.result(timeout=60)          # arq's Job: {"result": {...}, "metrics": {...}}, or raises
    view = await fetch_result(redis_url, job.job_id)   # the same by id, from any process

``enqueue_inference`` validates the inputs against the model first (``InputError``, nothing enqueued),
as ``xshard run`` does. ``fetch_result`` also sees through a replay: a job whose request was
dead-lettered and then replayed (``xshard replay``) reads as complete with the replayed request's result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from broker.ledger import Ledger
from broker.messages import StageResult
from broker.retry import sleep_unless_stopped
from broker.streams import Broker
from coordinator.manager import ModelShardingManager
from coordinator.service.errors import DeadLettered, JobFailed, JobNotFound
from coordinator.service.queue import INFERENCE_FUNCTION, job_handle, open_queue
from coordinator.service.spec import InferenceSpec
from coordinator.settings import ManagerSettings

POLL_S = 0.25


async def check_spec(spec: InferenceSpec, cache_dir: Path | None = None) -> InferenceSpec:
    """The spec with its inputs as the model's arrays; ModelError, PlanError, InputError as ``xshard run``."""
    manager = ModelShardingManager(
        model_name=spec.model,
        num_shards=spec.num_shards,
        shard_type=spec.shard_type,
        model_type=spec.model_type,
        browsers=list(spec.browsers) or None,
        platform=spec.platform,
        settings=ManagerSettings.from_env(cache_dir=cache_dir),
        progress=lambda _msg: None,
    )
    await manager.prepare()  # resolves and cuts the model locally, starts nothing
    arrays = manager.check_inputs(spec.inputs)
    return dataclasses.replace(spec, inputs=arrays)


async def enqueue_inference(
    redis: str | ArqRedis,
    *,
    model: str,
    inputs: Mapping[str, Any],
    shards: int = 2,
    shard_type: str = "layer",
    model_type: str = "text",
    browsers: Sequence[str] | None = None,
    platform: str = "auto",
    max_retries: int = 2,
    namespace: str | None = None,
    job_id: str | None = None,
    validate: bool = True,
    cache_dir: Path | None = None,
) -> Job:
    """Enqueue one inference; arq's ``Job``. ``redis`` is a URL or an ``open_queue()`` connection (reused)."""
    spec = InferenceSpec(
        model=model,
        num_shards=shards,
        inputs={name: np.asarray(a) for name, a in inputs.items()},
        shard_type=shard_type,
        model_type=model_type,
        browsers=tuple(browsers or ()),
        platform=platform,
        max_retries=max_retries,
    )
    if validate:
        spec = await check_spec(spec, cache_dir)
    ns = ManagerSettings.from_env(namespace=namespace).namespace
    conn = await open_queue(redis, ns) if isinstance(redis, str) else redis
    job = await conn.enqueue_job(INFERENCE_FUNCTION, spec.to_wire(), _job_id=job_id)
    if job is None:
        raise JobFailed(f"a job with id {job_id} exists already")
    return job


@dataclass(frozen=True, slots=True)
class JobView:
    """A job's outcome as far as it is known."""

    job_id: str
    status: str  # queued | deferred | running | replaying | complete | failed
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    error_kind: str = ""

    @property
    def done(self) -> bool:
        return self.status in ("complete", "failed")


async def _replayed(broker: Broker, job_id: str, failure: DeadLettered) -> JobView:
    """A dead-lettered job seen through the ledger: replayed since (complete, or still running) or not."""
    state = await Ledger(broker).state(failure.request_id) if failure.request_id else None
    if state is not None and isinstance(state.result, StageResult):
        metrics = {"request_id": failure.request_id, "replayed": True, "attempts": state.result.attempt}
        return JobView(job_id, "complete", dict(state.result.tensors), metrics)
    if state is not None and state.status == "pending":
        return JobView(job_id, "replaying", error=failure.message, error_kind="DeadLettered")
    return JobView(job_id, "failed", error=failure.message, error_kind="DeadLettered")


async def fetch_result(redis: ArqRedis, broker: Broker, job_id: str) -> JobView:
    """The job's outcome now; JobNotFound if the namespace has no such job."""
    job = job_handle(redis, broker.keys.ns, job_id)
    info = await job.result_info()
    if info is not None and info.success:
        out = info.result if isinstance(info.result, dict) else {}
        return JobView(job_id, "complete", dict(out.get("result") or {}), dict(out.get("metrics") or {}))
    if info is not None:
        if isinstance(info.result, DeadLettered):
            return await _replayed(broker, job_id, info.result)
        kind = type(info.result).__name__
        return JobView(job_id, "failed", error=str(info.result) or kind, error_kind=kind)
    status = await job.status()
    if status is JobStatus.not_found:
        raise JobNotFound(f"no job {job_id} in namespace {broker.keys.ns} (never enqueued, or its result expired)")
    names = {JobStatus.in_progress: "running", JobStatus.deferred: "deferred"}
    return JobView(job_id, names.get(status, "queued"))


async def wait_result(redis: ArqRedis, broker: Broker, job_id: str, timeout_s: float) -> JobView:
    """``fetch_result`` until the job is done or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        view = await fetch_result(redis, broker, job_id)
        if view.done or time.monotonic() >= deadline:
            return view
        await sleep_unless_stopped(POLL_S, None)
