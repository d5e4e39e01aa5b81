"""The history consumer: the events stream into DuckDB, in batches, each event exactly once.

One consumer group (``EVENTS_GROUP``) reads ``xshard:{ns}:events``. A batch is acked (XACK + XDEL)
only after its DuckDB transaction committed, so a consumer killed between the two leaves the batch
pending; the next start re-reads its pending entries first (XREADGROUP from id ``0``) and writes them
again, which adds nothing because the tables are idempotent on ``event_id``. Entries that cannot be
decoded, or are not history events, are acked and logged, never retried.

The consumer name is stable (``writer`` unless configured) so a restarted writer finds the entries its
previous run left pending. One writer per namespace and database file.

The consumer runs until ``close()``. A batch that fails (broker outage, database error or lock) is tried
again with backoff (``broker.retry.retrying``) after re-reading what is pending; once batches have kept
failing for ``max_outage_s`` the writer gives up and keeps the error in ``error``.

Runs inside the manager (``HistoryWriter`` as an async context manager on the manager's broker) or
alone: ``xshard history-writer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

from broker.errors import BrokerUnavailable
from broker.keys import EVENTS_GROUP
from broker.messages import Event, ExecutionEvent, PrecisionEvent, RecoveryEvent, RequestEvent
from broker.retry import Backoff, Stopped, poll, retrying
from broker.streams import Broker, Delivery
from coordinator.history.schema import event_row
from coordinator.history.store import HistoryError, HistoryStore, WriteResult

log = logging.getLogger(__name__)

EVENT_TYPES = (ExecutionEvent, RequestEvent, RecoveryEvent, PrecisionEvent)


@dataclass(frozen=True, slots=True)
class WriterSettings:
    consumer: str = "writer"
    batch_size: int = 256
    flush_interval_s: float = 1.0  # how long a partial batch may wait for more events
    block_ms: int = 500  # one XREADGROUP's wait when the stream is empty
    max_outage_s: float = 120.0  # how long batches may keep failing (database or broker) before the writer stops
    backoff_s: float = 0.5  # the wait after the first failed batch, doubling up to max_backoff_s
    max_backoff_s: float = 5.0
    lock_wait_s: float = 10.0  # waiting for another process to release the database file

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.block_ms < 1 or self.flush_interval_s < 0 or not self.max_outage_s > 0:
            raise ValueError(f"invalid history writer settings: {self}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(base_s=self.backoff_s, max_s=self.max_backoff_s)

    @classmethod
    def from_env(cls, **overrides: object) -> WriterSettings:
        """``XSHARD_HISTORY_<FIELD>`` environment variables, then ``overrides`` (None is ignored)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            env = os.environ.get(f"XSHARD_HISTORY_{f.name.upper()}")
            if env is not None:
                values[f.name] = type(getattr(cls(), f.name))(env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def sort_deliveries(deliveries: Sequence[Delivery]) -> tuple[list[Event], list[Delivery]]:
    """History events to write, and entries to ack without writing (undecodable or foreign)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    events: list[Event] = []
    rejected: list[Delivery] = []
    for d in deliveries:
        msg = d.message
        if not isinstance(msg, EVENT_TYPES):
            why = d.error or f"{type(msg).__name__} is not a history event"
            log.warning("history: dropping events entry %s: %s", d.entry_id, why)
            rejected.append(d)
            continue
        try:
            event_row(msg, now)
        except (TypeError, ValueError) as e:
            of = getattr(msg, "request_id", "") or f"plan {msg.plan_id}"
            log.warning("history: dropping %s %s of %s (entry %s): %s", msg.TYPE, msg.event_id, of, d.entry_id, e)
            rejected.append(d)
            continue
        events.append(msg)
    return events, rejected


class HistoryWriter:
    """Consumes the events stream of ``broker``'s namespace into the DuckDB file at ``db_path``."""

    def __init__(
        self,
        broker: Broker,
        db_path: str | Path,
        batch_size: int | None = None,
        flush_interval_s: float | None = None,
        *,
        settings: WriterSettings | None = None,
        on_commit: Callable[[WriteResult], None] | None = None,
    ) -> None:
        base = settings or WriterSettings.from_env()
        self.settings = replace(
            base,
            batch_size=batch_size if batch_size is not None else base.batch_size,
            flush_interval_s=flush_interval_s if flush_interval_s is not None else base.flush_interval_s,
        )
        self.broker = broker
        self.stream = broker.keys.events
        self.store = HistoryStore(db_path, self.settings.lock_wait_s)
        self.totals = WriteResult()
        self.dropped = 0
        self.error: BaseException | None = None
        self._on_commit = on_commit
        self._io = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._committing: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._batch_failed = False  # the failed batch is still pending: re-read it first

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The consuming loop (done when stopped, or failed: see ``error``)."""
        return self._task

    async def __aenter__(self) -> HistoryWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the group and the tables, write what an earlier run left pending, then consume."""
        await self.broker.ensure_group(self.stream, EVENTS_GROUP, "0")
        await self.store.when_unlocked(self.store.create)
        async with self._io:
            await self._drain_pending()
        name = f"history-writer {self.stream}"
        self._task = asyncio.get_running_loop().create_task(self._consume_until_stopped(), name=name)
        log.info("history: consuming %s into %s as %s", self.stream, self.store.db_path, self.settings.consumer)

    async def flush(self) -> WriteResult:
        """Write everything in the stream now (and anything left pending); returns what it added."""
        before = self.totals
        async with self._io:
            await self._drain_pending()
            while batch := await self._read(self.settings.batch_size, block_ms=1):
                await self._commit(batch)
        return self.totals - before

    async def close(self, flush: bool = True) -> None:
        """Stop consuming; with ``flush``, write what is in the stream first."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a failure is kept in self.error
                await self._task
            self._task = None
        if self._committing is not None and not self._committing.done():
            with contextlib.suppress(Exception):
                await self._committing
        if flush and self.error is None:
            await self.flush()

    # -- the loop --------------------------------------------------------------------------------

    async def _consume_until_stopped(self) -> None:
        s = self.settings
        try:
            async for _ in poll(0.0, self._stop):  # each read blocks up to block_ms
                await retrying(
                    self._consume_batch,
                    what="history: batch",
                    deadline_s=s.max_outage_s,
                    stop=self._stop,
                    backoff=s.backoff,
                    retry_on=(HistoryError, BrokerUnavailable),
                    on_retry=self._note_failed_batch,
                )
        except Stopped:
            return
        except (HistoryError, BrokerUnavailable) as e:
            log.error("history: giving up after %.0fs of failed batches: %s", s.max_outage_s, e)
            self.error = e
            raise
        except Exception as e:
            log.exception("history: the writer stopped")
            self.error = e
            raise

    def _note_failed_batch(self, _: BaseException) -> None:
        self._batch_failed = True

    async def _consume_batch(self) -> None:
        async with self._io:
            if self._batch_failed:
                await self._drain_pending()
                self._batch_failed = False
            batch = await self._collect()
            if batch:
                await self._commit(batch)

    async def _read(self, count: int, block_ms: int) -> list[Delivery]:
        return await self.broker.read_group(
            EVENTS_GROUP, self.settings.consumer, [self.stream], count=count, block_ms=block_ms
        )

    async def _collect(self) -> list[Delivery]:
        """Block for the first events, then gather more for up to ``flush_interval_s`` or a full batch."""
        s = self.settings
        batch = await self._read(s.batch_size, s.block_ms)
        deadline = time.monotonic() + s.flush_interval_s
        while batch and len(batch) < s.batch_size:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms < 1:
                break
            more = await self._read(s.batch_size - len(batch), min(left_ms, s.block_ms))
            batch += more
        return batch

    async def _drain_pending(self) -> None:
        pending = await self.broker.read_pending(
            EVENTS_GROUP, self.settings.consumer, [self.stream], count=self.settings.batch_size
        )
        if pending:
            log.info("history: re-reading %d pending events of %s", len(pending), self.settings.consumer)
        for i in range(0, len(pending), self.settings.batch_size):
            await self._commit(pending[i : i + self.settings.batch_size])

    async def _commit(self, batch: list[Delivery]) -> None:
        """Write, then ack; shielded so a cancelled loop does not tear the pair."""
        self._committing = asyncio.ensure_future(self._write_and_ack(batch))
        await asyncio.shield(self._committing)

    async def _write_and_ack(self, batch: list[Delivery]) -> None:
        events, rejected = sort_deliveries(batch)
        result = await self.store.when_unlocked(self.store.write_events, events) if events else WriteResult()
        for d in batch:
            await self.broker.ack(self.stream, EVENTS_GROUP, d.entry_id)
        self.totals += result
        self.dropped += len(rejected)
        log.debug(
            "history: wrote %d requests, %d executions, %d recoveries (%d already written, %d dropped)",
            result.requests,
            result.executions,
            result.recoveries,
            result.duplicates,
            len(rejected),
        )
        if self._on_commit is not None:
            self._on_commit(result)
