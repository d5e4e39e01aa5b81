"""arq's side of the coordinator service: the job function and the worker's settings, every one explicit.

``worker_options(...)`` is what ``xshard coordinator`` gives ``arq.Worker``; ``WorkerSettings`` is the
same for arq's own command line (``arq coordinator.service.jobs.WorkerSettings``, configured from
``REDIS_URL``, ``XSHARD_DB`` and ``XSHARD_*`` variables)::

    functions            xshard.run_inference, timeout job_timeout_s, max_tries, keep_result_s
    queue_name           arq:queue:xshard:{namespace}
    job_serializer       msgpack through broker.codec (both ways; nothing is unpickled)
    max_jobs             jobs at once in this coordinator
    job_timeout          job_timeout_s (> warmup_timeout_s + request_timeout_s)
    max_tries            first try + retries (a lost coordinator's jobs, too few workers)
    retry_jobs           True: a Retry or a cancelled job runs again
    job_completion_wait  shutdown_grace_s: SIGTERM lets running jobs finish
    health_check_key     per coordinator, refreshed every health_check_interval_s (its liveness)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from arq.worker import func

from coordinator.service.http import StatusServer
from coordinator.service.queue import INFERENCE_FUNCTION, health_check_key, queue_name, redis_settings
from coordinator.service.serializer import job_deserializer, job_serializer
from coordinator.service.service import CoordinatorService
from coordinator.service.settings import ServiceSettings

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


async def run_inference(ctx: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The inference job: ``spec`` is ``InferenceSpec.to_wire()``."""
    service: CoordinatorService = ctx["service"]
    return await service.run_inference(spec, int(ctx.get("job_try") or 1))


async def startup(ctx: dict[str, Any]) -> None:
    service: CoordinatorService = ctx["service"]
    await service.start(ctx["redis"])
    http: StatusServer | None = ctx.get("http")
    if http is not None:
        await http.start()


async def shutdown(ctx: dict[str, Any]) -> None:
    http: StatusServer | None = ctx.get("http")
    if http is not None:
        await http.close()
    service: CoordinatorService = ctx["service"]
    await service.close()


def worker_options(
    redis_url: str,
    settings: ServiceSettings,
    *,
    db_path: str | None = None,
    cache_dir: Path | None = None,
    http: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """``arq.Worker(**worker_options(...))`` runs a coordinator service."""
    service = CoordinatorService(redis_url, settings, db_path=db_path, cache_dir=cache_dir)
    ctx: dict[str, Any] = {"service": service}
    if http is not None:
        ctx["http"] = StatusServer(service, http[0], http[1])
    s = settings
    return {
        "functions": [
            func(
                run_inference,
                name=INFERENCE_FUNCTION,
                timeout=s.job_timeout_s,
                max_tries=s.max_tries,
                keep_result=s.keep_result_s,
            )
        ],
        "queue_name": queue_name(s.namespace),
        "redis_settings": redis_settings(redis_url),
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "max_jobs": s.max_jobs,
        "job_timeout": s.job_timeout_s,
        "max_tries": s.max_tries,
        "keep_result": s.keep_result_s,
        "retry_jobs": True,
        "poll_delay": s.poll_delay_s,
        "job_completion_wait": int(s.shutdown_grace_s),
        "health_check_interval": s.health_check_interval_s,
        "health_check_key": health_check_key(s.namespace, service.service_id),
        "ctx": ctx,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "log_results": False,  # results hold tensors
    }


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for arq's own command line (``arq coordinator.service.jobs.WorkerSettings``): the
    options above from ``REDIS_URL``, ``XSHARD_DB`` and ``XSHARD_*`` settings, built when arq asks."""
    if name == "WorkerSettings":
        url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        return worker_options(url, ServiceSettings.from_env(), db_path=os.environ.get("XSHARD_DB") or None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
