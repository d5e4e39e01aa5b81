"""Warm ``ModelShardingManager``s, one per ``ManagerKey``, bounded: the least recently used idle one is
closed first. A manager in use by a job is never closed under it; while every manager is busy the pool
may hold more than its bound until one is released.

Warming a manager is ``prepare()`` (resolve and cut the model: its errors are the job's fault, so
``JobRefused``) then ``initialize_sharding()`` on the workers registered in Redis (too few workers or an
unreachable broker: ``NoWorkers``, which the job may retry later). Jobs with the same key that arrive
while it warms wait for the one warm-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from coordinator.errors import XshardError
from coordinator.manager import ModelShardingManager
from coordinator.service.errors import JobRefused, NoWorkers
from coordinator.service.spec import ManagerKey

log = logging.getLogger(__name__)

MakeManager = Callable[[ManagerKey, str], ModelShardingManager]  # (key, coordinator id) -> a cold manager


@dataclass
class Warm:
    key: ManagerKey
    manager: ModelShardingManager
    users: int = 0
    recoveries_seen: set[str] = field(default_factory=set)  # recovery event ids already counted in the metrics


class ManagerPool:
    def __init__(self, make: MakeManager, service_id: str, size: int, warmup_timeout_s: float) -> None:
        self._make = make
        self.service_id = service_id
        self.size = size
        self.warmup_timeout_s = warmup_timeout_s
        self._warm: OrderedDict[ManagerKey, Warm] = OrderedDict()
        self._locks: dict[ManagerKey, asyncio.Lock] = {}
        self._made = 0
        self._closed = False

    async def __aenter__(self) -> ManagerPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def entries(self) -> list[Warm]:
        """The warm managers, least recently used first."""
        return list(self._warm.values())

    @asynccontextmanager
    async def lease(self, key: ManagerKey) -> AsyncIterator[Warm]:
        """A warm manager for ``key``, kept from eviction until the block ends."""
        warm = await self._get(key)
        try:
            yield warm
        finally:
            warm.users -= 1
            await self._evict()

    async def _get(self, key: ManagerKey) -> Warm:
        if self._closed:
            raise NoWorkers("the coordinator is shutting down")
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            warm = self._warm.get(key)
            if warm is None:
                manager = await self._warm_up(key)
                history = manager.get_performance_history().get("recovery_events", [])
                warm = Warm(
                    key, manager, recoveries_seen={str(e.get("event_id")) for e in history}
                )  # earlier runs' events
                self._warm[key] = warm
            warm.users += 1
            self._warm.move_to_end(key)
        await self._evict()
        return warm

    async def _warm_up(self, key: ManagerKey) -> ModelShardingManager:
        self._made += 1
        try:
            manager = self._make(key, f"{self.service_id}-m{self._made}")
        except ValueError as e:  # a shard type, level or shard count the manager refuses
            raise JobRefused(str(e)) from e
        log.info("warming a manager for %s as %s", key.label(), manager.coordinator_id)
        try:
            await manager.prepare()
        except XshardError as e:
            await manager.close()
            raise JobRefused(str(e)) from e
        try:
            ok = await asyncio.wait_for(manager.initialize_sharding(), self.warmup_timeout_s)
        except TimeoutError:
            ok, manager.last_error = False, f"not ready within warmup_timeout_s={self.warmup_timeout_s}"
        if not ok:
            await manager.close()
            raise NoWorkers(f"no manager for {key.label()}: {manager.last_error}")
        return manager

    async def _evict(self) -> None:
        while len(self._warm) > self.size:
            idle = next((w for w in self._warm.values() if w.users == 0), None)
            if idle is None:
                return
            del self._warm[idle.key]
            log.info("closing the least recently used manager %s (%s)", idle.key.label(), idle.manager.coordinator_id)
            await idle.manager.close()

    async def close(self) -> None:
        self._closed = True
        while self._warm:
            _, warm = self._warm.popitem(last=False)
            await warm.manager.close()
