"""arq's side of Redis for one namespace: the queue, the jobs, their results, the coordinators' health.
The only module that names arq's keys; it reads them through arq's own ``ArqRedis`` and ``Job``.

Key layout (arq's, ``{ns}`` the xshard namespace)::

    arq:queue:xshard:{ns}                             ZSET    job ids by when they may run
    arq:queue:xshard:{ns}:health-check:{service_id}   STRING  a coordinator's health line, expires after
                                                              health_check_interval_s + 1 s
    arq:job:{job_id}                                  STRING  the job: msgpack (``serializer``)
    arq:in-progress:{job_id}                          STRING  held while a coordinator runs it (its lease)
    arq:retry:{job_id}                                STRING  tries started
    arq:result:{job_id}                               STRING  the outcome: msgpack, kept keep_result_s

Job ids, the job and result keys are arq's and global to the server; the queue name carries the
namespace, and a result records its queue, so listings keep to one namespace.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import health_check_key_suffix
from arq.jobs import Job, JobStatus
from redis.exceptions import RedisError

from broker.address import connection_options, redact
from broker.errors import BrokerUnavailable
from coordinator.service.serializer import job_deserializer, job_serializer

INFERENCE_FUNCTION = "xshard.run_inference"
CONNECT_TIMEOUT_S = 5
CONNECT_RETRIES = 5
_HEALTH = re.compile(r"j_complete=(\d+) j_failed=(\d+) j_retried=(\d+) j_ongoing=(\d+) queued=(\d+)")


def queue_name(namespace: str) -> str:
    return f"arq:queue:xshard:{namespace}"


def health_check_key(namespace: str, service_id: str) -> str:
    return f"{queue_name(namespace)}{health_check_key_suffix}:{service_id}"


def redis_settings(redis_url: str) -> RedisSettings:
    """arq's settings for ``redis_url``, with ``rediss://`` verified as ``broker.address`` does it."""
    return dataclasses.replace(
        RedisSettings.from_dsn(redis_url),
        conn_timeout=CONNECT_TIMEOUT_S,
        conn_retries=CONNECT_RETRIES,
        **connection_options(redis_url),
    )


async def open_queue(redis_url: str, namespace: str) -> ArqRedis:
    """An arq connection whose jobs and results are msgpack; close it with ``await redis.aclose()``.
    BrokerUnavailable when the server cannot be reached (after arq's ``CONNECT_RETRIES``)."""
    try:
        return await create_pool(
            redis_settings(redis_url),
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            default_queue_name=queue_name(namespace),
        )
    except (RedisError, OSError) as e:
        raise BrokerUnavailable(redact(f"arq queue on {redis_url}: {e}")) from e


def job_handle(redis: ArqRedis, namespace: str, job_id: str) -> Job:
    return Job(job_id, redis, _queue_name=queue_name(namespace), _deserializer=job_deserializer)


@dataclass(frozen=True, slots=True)
class CoordinatorHealth:
    """One coordinator's last health line (arq's counters)."""

    service_id: str
    jobs_complete: int
    jobs_failed: int
    jobs_retried: int
    jobs_ongoing: int
    line: str


async def coordinators_alive(redis: ArqRedis, namespace: str) -> list[CoordinatorHealth]:
    prefix = health_check_key(namespace, "")
    out = []
    async for key in redis.scan_iter(match=f"{prefix}*"):
        name = key.decode() if isinstance(key, bytes) else str(key)
        raw = await redis.get(name)
        if raw is None:
            continue
        line = raw.decode() if isinstance(raw, bytes) else str(raw)
        m = _HEALTH.search(line)
        complete, failed, retried, ongoing = (int(x) for x in m.groups()[:4]) if m else (0, 0, 0, 0)
        out.append(CoordinatorHealth(name[len(prefix) :], complete, failed, retried, ongoing, line))
    return sorted(out, key=lambda c: c.service_id)


async def queue_depth(redis: ArqRedis, namespace: str) -> int:
    return int(await redis.zcard(queue_name(namespace)))


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job as ``xshard jobs`` lists it."""

    job_id: str
    status: str  # queued | deferred | running | complete | failed
    job_try: int
    enqueued_ms: float
    model: str
    outcome: str  # the failure's kind and message, or the request id of a result


def _model(args: Any) -> str:
    spec = args[0] if isinstance(args, list | tuple) and args else {}
    return str(spec.get("model", "")) if isinstance(spec, dict) else ""


async def queued_jobs(redis: ArqRedis, namespace: str) -> list[JobRow]:
    rows = []
    for raw_id in await redis.zrange(queue_name(namespace), 0, -1):
        job = job_handle(redis, namespace, raw_id.decode())
        info, status = await job.info(), await job.status()
        if info is None or status is JobStatus.complete:
            continue  # finished between the two reads: listed with the results
        state = {JobStatus.in_progress: "running", JobStatus.deferred: "deferred"}.get(status, "queued")
        tries = int(info.job_try or 0)
        rows.append(JobRow(job.job_id, state, tries, info.enqueue_time.timestamp() * 1000, _model(info.args), ""))
    return rows


async def finished_jobs(redis: ArqRedis, namespace: str) -> list[JobRow]:
    rows = []
    for r in await redis.all_job_results():
        if r.queue_name != queue_name(namespace) or r.job_id is None:
            continue
        if r.success:
            outcome = str(((r.result or {}).get("metrics") or {}).get("request_id", ""))
        else:
            outcome = f"{type(r.result).__name__}: {r.result}"
        status = "complete" if r.success else "failed"
        rows.append(JobRow(r.job_id, status, r.job_try, r.enqueue_time.timestamp() * 1000, _model(r.args), outcome))
    return rows
