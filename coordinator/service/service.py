"""``CoordinatorService``: what one ``xshard coordinator`` process holds while arq runs its jobs: a broker
connection, the warm-manager pool, the metrics, the fleet status it refreshes, the orphan sweep and
(optionally) the HTTP page. arq's job functions (``jobs``) call ``run_inference``.

How a job ends::

    result            -> {"result": {name: array}, "metrics": {...}}   (as run_inference_sharded's)
    bad payload, model, plan or inputs                 -> JobRefused       (no retry)
    request in the dead letter                         -> DeadLettered     (xshard replay re-runs it)
    too few workers, broker unavailable, tries left    -> arq Retry after retry_defer_s
    ... no tries left                                  -> NoWorkers
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Retry

from broker.address import redact
from broker.errors import BrokerError
from broker.ledger import Ledger
from broker.retry import poll
from broker.streams import Broker
from coordinator.errors import InputError
from coordinator.manager import ModelShardingManager
from coordinator.service.errors import DeadLettered, JobRefused, NoWorkers
from coordinator.service.metrics import ServiceMetrics
from coordinator.service.orphans import SERVICE_PREFIX, sweep_orphans
from coordinator.service.pool import ManagerPool, Warm
from coordinator.service.queue import coordinators_alive
from coordinator.service.settings import ServiceSettings
from coordinator.service.spec import InferenceSpec, ManagerKey
from coordinator.service.status import FleetStatus, read_fleet
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}


class CoordinatorService:
    def __init__(
        self,
        redis_url: str,
        settings: ServiceSettings,
        *,
        db_path: str | None = None,
        cache_dir: Path | None = None,
        service_id: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.settings = settings
        self.db_path = db_path
        self.cache_dir = cache_dir
        self.service_id = service_id or f"{SERVICE_PREFIX}{uuid.uuid4().hex[:10]}"
        self.broker = Broker(redis_url, settings.namespace)
        self.ledger = Ledger(self.broker)
        self.metrics = ServiceMetrics()
        self.pool = ManagerPool(self._make_manager, self.service_id, settings.pool_size, settings.warmup_timeout_s)
        self.fleet: FleetStatus | None = None
        self._redis: ArqRedis | None = None
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    def _make_manager(self, key: ManagerKey, coordinator_id: str) -> ModelShardingManager:
        s = self.settings
        settings = ManagerSettings.from_env(
            namespace=s.namespace,
            cache_dir=self.cache_dir,
            coordinator_id=coordinator_id,
            request_timeout_s=s.request_timeout_s,
            worker_wait_s=0.4 * s.warmup_timeout_s,
            assign_timeout_s=0.5 * s.warmup_timeout_s,
        )
        return ModelShardingManager(
            model_name=key.model,
            num_shards=key.num_shards,
            shard_type=key.shard_type,
            model_type=key.model_type,
            db_path=self.db_path,
            redis_url=self.redis_url,
            browsers=list(key.browsers) or None,
            platform=key.platform,
            settings=settings,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, redis: ArqRedis) -> None:
        """Connect, then refresh the status and sweep orphans in the background until ``close``."""
        await self.broker.ping()
        self._redis = redis
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._every(self.settings.status_interval_s, self.refresh_status, "status")),
            loop.create_task(self._every(self.settings.sweep_interval_s, self.sweep, "orphan sweep")),
        ]
        log.info(
            "coordinator %s serving namespace %s on %s",
            self.service_id,
            self.settings.namespace,
            redact(self.redis_url),
        )

    async def close(self) -> None:
        self._stop.set()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.pool.close()
        await self.broker.close()

    async def _every(self, interval_s: float, tick: Callable[[], Awaitable[Any]], what: str) -> None:
        async for _ in poll(interval_s, self._stop):
            try:
                await tick()
            except BrokerError as e:
                log.warning("coordinator %s: %s failed: %s", self.service_id, what, e)

    async def refresh_status(self) -> FleetStatus:
        assert self._redis is not None
        fleet = await read_fleet(self.broker, self._redis, self.breakers())
        self.metrics.record_fleet(fleet, len(self.pool.entries()))
        self.fleet = fleet
        return fleet

    async def sweep(self) -> list[str]:
        assert self._redis is not None
        alive = {c.service_id for c in await coordinators_alive(self._redis, self.settings.namespace)}
        return await sweep_orphans(self.broker, self.ledger, alive | {self.service_id}, self.settings.lease_s)

    def breakers(self) -> dict[str, str]:
        """worker id -> the worst breaker state any warm manager holds for it."""
        out: dict[str, str] = {}
        for warm in self.pool.entries():
            for name, b in warm.manager.get_metrics()["circuit_breakers"].items():
                state = str(b.get("state", "closed"))
                if BREAKER_RANK.get(state, 0) >= BREAKER_RANK.get(out.get(name, "closed"), 0):
                    out[name] = state
        return out

    # -- jobs --------------------------------------------------------------------------------

    async def run_inference(self, wire: Any, job_try: int) -> dict[str, Any]:
        """The body of an inference job (see the module docstring for how it ends)."""
        try:
            spec = InferenceSpec.from_wire(wire)
            async with self.pool.lease(spec.key) as warm:
                return await self._run(warm, spec)
        except JobRefused:
            self.metrics.record_failure("refused")
            raise
        except DeadLettered:
            self.metrics.record_failure("dead_letter")
            raise
        except NoWorkers as e:
            if job_try < self.settings.max_tries:
                log.warning("job try %d: %s; again in %.0fs", job_try, e, self.settings.retry_defer_s)
                raise Retry(defer=self.settings.retry_defer_s) from e
            self.metrics.record_failure("no_workers")
            raise

    async def _run(self, warm: Warm, spec: InferenceSpec) -> dict[str, Any]:
        manager = warm.manager
        try:
            arrays = manager.check_inputs(spec.inputs)
        except InputError as e:
            raise JobRefused(str(e)) from e
        res = await manager.run_inference_sharded(arrays, max_retries=spec.max_retries)
        self._harvest_recoveries(warm)
        if "result" in res:
            self.metrics.record_success(spec.model, res["metrics"])
            return {"result": res["result"], "metrics": res["metrics"]}
        kind, request_id = res.get("error_kind"), str(res.get("request_id", ""))
        if kind == "dead_letter":
            raise DeadLettered(res["error"], request_id=request_id)
        if kind == "input":
            raise JobRefused(res["error"], request_id=request_id)
        raise NoWorkers(res["error"], request_id=request_id)

    def _harvest_recoveries(self, warm: Warm) -> None:
        with contextlib.suppress(KeyError, TypeError):
            events = warm.manager.get_performance_history()["recovery_events"]
            fresh = [e for e in events if e.get("event_id") not in warm.recoveries_seen]
            warm.recoveries_seen.update(e.get("event_id") for e in fresh)
            self.metrics.record_recoveries(fresh)
