"""The coordinator's side of the streams: submit stage-0 jobs and assignments, and read the reply
stream (results, failures, assignment replies) into futures. One reader task per coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from broker.errors import BrokerUnavailable
from broker.keys import REPLY_GROUP
from broker.messages import Assignment, AssignmentReply, ShardFailure, ShardJob, ShardResult
from broker.streams import Broker

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500


class Dispatcher:
    def __init__(self, broker: Broker, coordinator_id: str) -> None:
        self.broker = broker
        self.coordinator_id = coordinator_id
        self.reply_stream = broker.keys.reply(coordinator_id)
        self._requests: dict[str, asyncio.Future[ShardResult | ShardFailure]] = {}
        self._assignments: dict[str, asyncio.Future[AssignmentReply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.broker.ensure_group(self.reply_stream, REPLY_GROUP, "0")
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        pending: list[asyncio.Future[Any]] = [*self._requests.values(), *self._assignments.values()]
        for fut in pending:
            if not fut.done():
                fut.cancel()

    async def submit(self, job: ShardJob) -> asyncio.Future[ShardResult | ShardFailure]:
        fut: asyncio.Future[ShardResult | ShardFailure] = asyncio.get_running_loop().create_future()
        self._requests[job.request_id] = fut
        try:
            await self.broker.add(job.route[0], job)
        except BaseException:
            self._requests.pop(job.request_id, None)
            raise
        return fut

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def assign(self, worker_id: str, a: Assignment) -> asyncio.Future[AssignmentReply]:
        fut: asyncio.Future[AssignmentReply] = asyncio.get_running_loop().create_future()
        self._assignments[a.assignment_id] = fut
        await self.broker.add(self.broker.keys.control(worker_id), a)
        return fut

    async def _read_loop(self) -> None:
        consumer = self.coordinator_id
        while True:
            try:
                deliveries = await self.broker.read_group(
                    REPLY_GROUP, consumer, [self.reply_stream], count=64, block_ms=READ_BLOCK_MS
                )
            except BrokerUnavailable as e:
                log.warning("coordinator %s: reply stream unavailable (%s); retrying", self.coordinator_id, e)
                await asyncio.sleep(0.5)
                continue
            for d in deliveries:
                self._resolve(d.message, d.error)
                await asyncio.shield(self.broker.ack(d.stream, REPLY_GROUP, d.entry_id))

    def _resolve(self, msg: Any, error: str | None) -> None:
        if isinstance(msg, ShardResult | ShardFailure):
            fut = self._requests.pop(msg.request_id, None)
            if fut is None:
                log.info("request %s: late or duplicate %s ignored", msg.request_id, msg.TYPE)
            elif not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, AssignmentReply):
            afut = self._assignments.pop(msg.assignment_id, None)
            if afut is not None and not afut.done():
                afut.set_result(msg)
        else:
            log.error("coordinator %s: undecodable reply entry: %s", self.coordinator_id, error or msg)
