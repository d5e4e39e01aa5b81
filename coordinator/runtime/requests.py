"""Requests in flight: accepted into Redis (``Ledger.accept``), finished once (``Ledger.finish``),
resumed by a restarted coordinator with the same id. Futures resolve to the result or the dead letter."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

from broker.errors import BrokerUnavailable
from broker.ledger import Ledger
from broker.messages import DeadLetter, StageHop, StageResult
from broker.retry import retrying
from coordinator.runtime.dispatch import Entry

log = logging.getLogger(__name__)

SUBMIT_DEADLINE_S = 30.0
# a result in hand is recorded through an outage of up to this long: ``finish`` is idempotent, and its
# MULTI may have committed (acking and deleting the reply entry) when the connection dropped, so the
# entry cannot be relied on to be read again
FINISH_DEADLINE_S = 60.0

Outcome = StageResult | DeadLetter


class RequestTracker:
    def __init__(self, ledger: Ledger, coordinator_id: str) -> None:
        self.ledger = ledger
        self.coordinator_id = coordinator_id
        self._futures: dict[str, asyncio.Future[Outcome]] = {}
        self._delivered: dict[str, set[str]] = {}  # request id -> reply entries whose ``finish`` committed

    def watch(self, request_id: str) -> asyncio.Future[Outcome]:
        fut = self._futures.get(request_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._futures[request_id] = fut
        return fut

    def deliveries(self, request_id: str) -> int:
        """Results of the request that reached this coordinator: distinct reply entries whose ``finish``
        committed (an entry read again after a broker outage interrupted its ``finish`` counts once)."""
        return len(self._delivered.get(request_id, ()))

    def forget(self, request_id: str) -> None:
        self._futures.pop(request_id, None)

    async def submit(self, job: StageHop) -> asyncio.Future[Outcome]:
        """Accept the request (one MULTI); rides out a broker outage for up to ``SUBMIT_DEADLINE_S``."""
        fut = self.watch(job.request_id)
        tries = 0

        async def accept() -> None:
            # a MULTI that committed before the connection dropped is not run again (its job would run twice)
            nonlocal tries
            tries += 1
            if tries == 1 or not await self.ledger.known(job.request_id):
                await self.ledger.accept(job, self.coordinator_id)

        try:
            await retrying(
                accept,
                what=f"request {job.request_id}: submit",
                deadline_s=SUBMIT_DEADLINE_S,
            )
        except BrokerUnavailable:
            self.forget(job.request_id)
            raise
        return fut

    async def on_result(self, msg: StageResult, entry: Entry) -> None:
        await retrying(
            lambda: self.ledger.finish(msg.request_id, self.coordinator_id, "done", msg, entry),
            what=f"request {msg.request_id}: finish",
            deadline_s=FINISH_DEADLINE_S,
        )
        self._delivered.setdefault(msg.request_id, set()).add(entry[1])
        fut = self._futures.pop(msg.request_id, None)
        if fut is None:
            log.info("request %s: result recorded (no caller waiting here)", msg.request_id)
        elif not fut.done():
            fut.set_result(msg)

    def dead(self, dead: DeadLetter) -> None:
        fut = self._futures.pop(dead.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(dead)

    async def replay(
        self, reply_stream: str, wanted: Collection[str] | None = None, route_head: str | None = None
    ) -> dict[str, tuple[str, asyncio.Future[Outcome]]]:
        """Put dead letters back on their stage streams (``Ledger.exhume``), their results to ``reply_stream``:
        all, or the entry ids ``wanted``; only those of the plan whose first stage stream is ``route_head``
        when given. Per entry id: its request id and the future of its new outcome."""
        waits = {}
        for entry_id, dead, _ in await self.ledger.dead_letters():
            if dead is None or (wanted is not None and entry_id not in wanted):
                continue
            if route_head is not None and dead.route[:1] != (route_head,):
                continue
            fut = self.watch(dead.request_id)
            await self.ledger.exhume(entry_id, dead.replayed(reply_stream, time.time() * 1000.0), self.coordinator_id)
            waits[entry_id] = (dead.request_id, fut)
        return waits

    async def resume(self) -> list[str]:
        """Watch every request this coordinator id accepted and has not finished."""
        ids = await self.ledger.inflight(self.coordinator_id)
        for request_id in ids:
            self.watch(request_id)
        return ids

    def cancel_all(self) -> None:
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()
