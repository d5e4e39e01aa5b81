"""Performance history in DuckDB: the guide's four tables (``schema``), written only by the history consumer.

``write_events`` writes one batch in one transaction with ``INSERT ... ON CONFLICT DO NOTHING``, so a
redelivered event is written once. Each operation opens the file and closes it again: the writer holds
DuckDB's file lock only while it writes, and readers (the manager, ``xshard history``, ``xshard report``)
open it read-only and never create it.

Within one process, every ``HistoryStore`` on the same file takes turns (one lock per file), so the manager's
reads never collide with its own writer. Another process holding the file (a separate ``xshard
history-writer``, say) makes an open fail at once with ``HistoryLocked``; ``when_unlocked`` runs an
operation in a thread and tries again with backoff for up to ``lock_wait_s`` (``broker.retry.retrying``,
the one retry loop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import astuple, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from broker.messages import Event
from broker.retry import Backoff, retrying
from coordinator.errors import XshardError
from coordinator.history.schema import METRICS_TABLE, REFRESH_METRICS, SCHEMA, TABLES, event_row
from coordinator.history.summary import MODELS_SQL, TIMELINE_LENGTH, merge_history, read_model_history
from coordinator.planning.recommendations import BrowserStat

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_WAIT_S = 10.0
LOCK_BACKOFF = Backoff(base_s=0.02, factor=2.0, max_s=0.25)  # waiting for another process's write


class HistoryError(XshardError):
    """The history database cannot be opened, read or written."""


class HistoryLocked(HistoryError):
    """Another process holds the history database file (DuckDB's file lock); try again shortly."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch added; ``duplicates`` were already in the database (redelivered)."""

    requests: int = 0
    executions: int = 0
    recoveries: int = 0
    duplicates: int = 0
    precisions: int = 0

    @property
    def written(self) -> int:
        return self.requests + self.executions + self.recoveries + self.precisions

    def __add__(self, other: WriteResult) -> WriteResult:
        return WriteResult(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: WriteResult) -> WriteResult:
        return WriteResult(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


class Reader:
    """Runs read-only queries on one open connection (or answers ``[]`` when there is no history)."""

    def __init__(self, con: duckdb.DuckDBPyConnection | None) -> None:
        self._con = con

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self._con is None:
            return []
        cur = self._con.execute(sql, list(params))
        names = [d[0] for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _is_lock_conflict(e: duckdb.Error) -> bool:
    text = str(e)
    return "lock" in text.lower() or "different configuration" in text


def _lacks_columns(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether a table misses a column of ``TABLES`` (a file written by an earlier version)."""
    have = {(t, c) for t, c in con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()}
    return any((table, c) not in have for table, cols in TABLES.items() for c, _ in cols)


_FILE_LOCKS: dict[Path, threading.RLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path) -> threading.RLock:
    """The one lock of this process for the database file at ``path``."""
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(path.resolve(), threading.RLock())


class HistoryStore:
    """The DuckDB history file. Thread-safe; async callers use ``when_unlocked`` (or ``asyncio.to_thread``)."""

    def __init__(self, db_path: str | Path, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.db_path = Path(db_path)
        self.lock_wait_s = lock_wait_s
        self._lock = _file_lock(self.db_path)

    @property
    def exists(self) -> bool:
        return self.db_path.is_file()

    async def when_unlocked(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``op(*args, **kwargs)`` in a worker thread; while another process holds the file (``HistoryLocked``),
        try again with backoff for up to ``lock_wait_s``, then raise ``HistoryLocked``."""
        call = functools.partial(op, *args, **kwargs)
        return await retrying(
            lambda: asyncio.to_thread(call),
            what=f"history database {self.db_path}",
            deadline_s=self.lock_wait_s,
            backoff=LOCK_BACKOFF,
            retry_on=(HistoryLocked,),
        )

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """One try: ``HistoryLocked`` when another process holds the file, ``HistoryError`` for the rest."""
        with self._lock:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only)
            except duckdb.Error as e:
                error = HistoryLocked if _is_lock_conflict(e) else HistoryError
                raise error(f"cannot open history database {self.db_path}: {e}") from e
            try:
                yield con
            except duckdb.Error as e:
                raise HistoryError(f"history database {self.db_path}: {e}") from e
            finally:
                con.close()

    def create(self) -> None:
        """Create the file and the four tables (the writer does this on start)."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as con:
            for statement in SCHEMA:
                con.execute(statement)

    def write_events(self, events: Iterable[Event]) -> WriteResult:
        """Write a batch in one transaction; events already written (same event_id) are skipped.

        Raises TypeError/ValueError before touching the file if an event has a field of the wrong type."""
        now = datetime.now(UTC).replace(tzinfo=None)
        rows: dict[str, list[tuple[Any, ...]]] = {name: [] for name in TABLES}
        for event in events:
            table, row = event_row(event, now)
            rows[table].append(row)
        if not any(rows.values()):
            return WriteResult()
        models = sorted({row[3] for row in rows["model_sharding_components"]})
        inserted: dict[str, int] = {}
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as con:
            for statement in SCHEMA:
                con.execute(statement)
            con.execute("BEGIN TRANSACTION")
            try:
                for table, table_rows in rows.items():
                    inserted[table] = self._insert(con, table, table_rows)
                if models:
                    con.execute(
                        f"DELETE FROM {METRICS_TABLE} WHERE model_name IN (SELECT unnest(?::VARCHAR[]))", [models]
                    )
                    con.execute(REFRESH_METRICS, [now, models])
                con.execute("COMMIT")
            except BaseException:
                with suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        total = sum(len(r) for r in rows.values())
        result = WriteResult(
            inserted["model_sharding_history"],
            inserted["model_sharding_components"],
            inserted["model_sharding_recovery_events"],
            precisions=inserted["model_sharding_precision"],
        )
        return replace(result, duplicates=total - result.written)

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        cols = TABLES[table]
        names = ", ".join(c for c, _ in cols)
        unnests = ", ".join(f"unnest(?::{t}[]) AS {c}" for c, t in cols)
        sql = f"INSERT INTO {table} ({names}) SELECT * FROM (SELECT {unnests}) ON CONFLICT DO NOTHING"
        reply = con.execute(sql, [list(column) for column in zip(*rows, strict=True)]).fetchone()
        return int(reply[0]) if reply else 0

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Reader]:
        """One read-only connection for several queries; every query returns ``[]`` if the database or
        its tables do not exist yet."""
        if not self.exists:
            yield Reader(None)
            return
        for first in (True, False):
            with self._connect(read_only=True) as con:
                have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                ready = {*TABLES, METRICS_TABLE} <= have
                if not (ready and first and _lacks_columns(con)):
                    yield Reader(con if ready else None)
                    return
            log.info("history: adding the columns of this version to %s", self.db_path)
            self.create()  # runs MIGRATIONS: a file from an earlier version gains its new columns

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, read-only; ``[]`` if the database or its tables do not exist yet."""
        with self.reading() as r:
            return r.rows(sql, params)

    def models(self) -> list[dict[str, Any]]:
        """Every model with history, most recently active first: requests, executions, recoveries,
        first and last activity (epoch ms)."""
        return self.query(MODELS_SQL)

    def browser_stats(
        self,
        model_name: str,
        shard_type: str | None = None,
        *,
        by_shard: bool = False,
        plan_id: str | None = None,
        by_kind: bool = False,
    ) -> list[BrowserStat]:
        """Per shard type and browser+platform (from the metrics table); with ``by_shard``, per shard index
        too (from the components, of ``plan_id`` if given); with ``by_kind``, per kind of shard over all
        shards (``kind`` set, ``shard_index`` None; shards without a kind are left out)."""
        if by_kind:
            rows = self.query(
                """
                SELECT browser, platform, count(*) AS runs, count(*) FILTER (outcome = 'success') AS successes,
                       coalesce(quantile_cont(kernel_ms, 0.5) FILTER (outcome = 'success'), 0) AS p50_kernel_ms,
                       coalesce(quantile_cont(kernel_ms, 0.95) FILTER (outcome = 'success'), 0) AS p95_kernel_ms,
                       coalesce(avg(kernel_ms) FILTER (outcome = 'success'), 0) AS avg_kernel_ms,
                       model_name, shard_type, NULL AS shard_index, kind
                FROM model_sharding_components
                WHERE model_name = ? AND (?::VARCHAR IS NULL OR shard_type = ?) AND kind <> ''
                GROUP BY ALL ORDER BY shard_type, kind, browser, platform""",
                [model_name, shard_type, shard_type],
            )
        elif not by_shard:
            rows = self.query(
                f"""
                SELECT browser, platform, execution_count AS runs, success_count AS successes,
                       p50_kernel_ms, p95_kernel_ms, avg_kernel_ms, model_name, shard_type, NULL AS shard_index
                FROM {METRICS_TABLE} WHERE model_name = ? AND (?::VARCHAR IS NULL OR shard_type = ?)
                ORDER BY shard_type, browser, platform""",
                [model_name, shard_type, shard_type],
            )
        else:
            rows = self.query(
                """
                SELECT browser, platform, count(*) AS runs, count(*) FILTER (outcome = 'success') AS successes,
                       coalesce(quantile_cont(kernel_ms, 0.5) FILTER (outcome = 'success'), 0) AS p50_kernel_ms,
                       coalesce(quantile_cont(kernel_ms, 0.95) FILTER (outcome = 'success'), 0) AS p95_kernel_ms,
                       coalesce(avg(kernel_ms) FILTER (outcome = 'success'), 0) AS avg_kernel_ms,
                       model_name, shard_type, shard_index
                FROM model_sharding_components
                WHERE model_name = ? AND (?::VARCHAR IS NULL OR shard_type = ?) AND (?::VARCHAR IS NULL OR plan_id = ?)
                GROUP BY ALL ORDER BY shard_type, shard_index, browser, platform""",
                [model_name, shard_type, shard_type, plan_id, plan_id],
            )
        return [BrowserStat(**r) for r in rows]

    def model_history(
        self, model_name: str, plan_id: str | None = None, timeline_length: int = TIMELINE_LENGTH
    ) -> dict[str, Any]:
        """The guide's ``get_performance_history()`` structure from the database (components of
        ``plan_id`` only, if given); empty sections when there is no history."""
        with self.reading() as r:
            return read_model_history(r, model_name, plan_id, timeline_length)


__all__ = [
    "BrowserStat",
    "HistoryError",
    "HistoryLocked",
    "HistoryStore",
    "Reader",
    "WriteResult",
    "merge_history",
]
