"""The coordinator's side of the streams: submit jobs and assignments, and read the reply stream
(results, failures, assignment replies). One reader task per coordinator, reading until ``close()``; what
is read is handed to callbacks and acked by them (a result is acked in the same MULTI that records it).
A broker outage is ridden out with backoff (``broker.retry.retrying``); after it, the entries read but
not acked are read again first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.errors import BrokerUnavailable
from broker.keys import REPLY_GROUP
from broker.messages import Assignment, AssignmentReply, StageFailure, StageResult
from broker.retry import Stopped, poll, retrying
from broker.streams import Broker

log = logging.getLogger(__name__)

READ_BLOCK_MS = 500
READ_COUNT = 64

Entry = tuple[str, str]  # (stream, entry id)
OnResult = Callable[[StageResult, Entry], Awaitable[None]]
OnFailure = Callable[[StageFailure, Entry], Awaitable[None]]


class Dispatcher:
    def __init__(self, broker: Broker, coordinator_id: str, on_result: OnResult, on_failure: OnFailure) -> None:
        self.broker = broker
        self.coordinator_id = coordinator_id
        self.reply_stream = broker.keys.reply(coordinator_id)
        self._on_result = on_result
        self._on_failure = on_failure
        self._assignments: dict[str, asyncio.Future[AssignmentReply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._recoveries: set[asyncio.Task[None]] = set()
        self._recovering: set[str] = set()  # failure entries whose recovery runs (not taken again when re-read)
        self._stop = asyncio.Event()
        self._reread_pending = True  # entries read before a restart or an outage but not acked

    async def start(self) -> None:
        await self.broker.ensure_group(self.reply_stream, REPLY_GROUP, "0")
        self._reader = asyncio.get_running_loop().create_task(self._read_until_stopped())

    async def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for task in list(self._recoveries):
            task.cancel()
        await asyncio.gather(*self._recoveries, return_exceptions=True)
        for fut in self._assignments.values():
            if not fut.done():
                fut.cancel()

    async def assign(self, worker_id: str, a: Assignment) -> asyncio.Future[AssignmentReply]:
        fut: asyncio.Future[AssignmentReply] = asyncio.get_running_loop().create_future()
        self._assignments[a.assignment_id] = fut
        await self.broker.add(self.broker.keys.control(worker_id), a)
        return fut

    async def _recover(self, msg: StageFailure, entry: Entry) -> None:
        try:
            await self._on_failure(msg, entry)
        except BrokerUnavailable as e:
            # the entry was not acked: it is read again, and recovered again, once the broker is back
            log.warning("request %s: recovery of stage %d cut short: %s", msg.request_id, msg.stage_index, e)
            self._reread_pending = True
        except Exception:
            log.exception("request %s: recovery of stage %d failed", msg.request_id, msg.stage_index)
        finally:
            self._recovering.discard(entry[1])

    async def _read_until_stopped(self) -> None:
        """Read the reply stream until ``close()``."""
        what = f"coordinator {self.coordinator_id}: reply stream"
        with contextlib.suppress(Stopped):
            async for _ in poll(0.0, self._stop):  # each read blocks up to READ_BLOCK_MS
                await retrying(self._read_once, what=what, stop=self._stop, on_retry=self._after_outage)

    def _after_outage(self, _: BaseException) -> None:
        self._reread_pending = True

    async def _read_once(self) -> None:
        consumer, streams = self.coordinator_id, [self.reply_stream]
        if self._reread_pending:
            deliveries = await self.broker.read_own_pending(REPLY_GROUP, consumer, streams, READ_COUNT)
            self._reread_pending = bool(deliveries)
        else:
            deliveries = await self.broker.read_group(
                REPLY_GROUP, consumer, streams, count=READ_COUNT, block_ms=READ_BLOCK_MS
            )
        for d in deliveries:
            try:
                await self._handle(d.message, (d.stream, d.entry_id), d.error)
            except BrokerUnavailable:
                raise
            except Exception:  # one bad entry must not stop the coordinator reading its replies
                log.exception("coordinator %s: handling reply entry %s failed", consumer, d.entry_id)
                self._reread_pending = True

    async def _handle(self, msg: Any, entry: Entry, error: str | None) -> None:
        if isinstance(msg, StageResult):
            await asyncio.shield(self._on_result(msg, entry))
            return
        if isinstance(msg, StageFailure):
            if entry[1] in self._recovering:  # re-read after an outage while its recovery still runs
                return
            self._recovering.add(entry[1])
            # recovery may wait on replies read by this very loop (redistribution): run it beside the loop
            task = asyncio.get_running_loop().create_task(self._recover(msg, entry))
            self._recoveries.add(task)
            task.add_done_callback(self._recoveries.discard)
            return
        if isinstance(msg, AssignmentReply):
            fut = self._assignments.pop(msg.assignment_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            log.error("coordinator %s: undecodable reply entry %s: %s", self.coordinator_id, entry[1], error or msg)
        await asyncio.shield(self.broker.ack(entry[0], REPLY_GROUP, entry[1]))
