"""Performance history in DuckDB: the guide's four tables, written only by the history consumer.

Tables (``ts`` is when the event happened, UTC; ``recorded_at`` when it was written)::

    model_sharding_history            one row per request      PK request_id, UNIQUE event_id
    model_sharding_components         one row per shard run    PK event_id
    model_sharding_recovery_events    one row per recovery     PK event_id
    model_sharding_browser_metrics    per (model_name, shard_type, browser, platform), recomputed from
                                      the components of the models each batch touched

``write_events`` writes one batch in one transaction with ``INSERT ... ON CONFLICT DO NOTHING``, so a
redelivered event is written once. Each operation opens the file and closes it again: the writer holds
DuckDB's file lock only while it writes, and readers (the manager, ``xshard history``, ``xshard
report``) open it read-only, never create it, and wait briefly when the writer holds the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from broker.messages import Event, ExecutionEvent, RecoveryEvent, RequestEvent
from coordinator.errors import XshardError
from coordinator.planning.recommendations import BrowserStat

log = logging.getLogger(__name__)

LOCK_WAIT_S = 10.0
TIMELINE_LENGTH = 1000


class HistoryError(XshardError):
    """The history database cannot be opened, read or written."""


# (column, type) per table, in insert order; the first column is the primary key.
HISTORY_COLUMNS = (
    ("request_id", "VARCHAR"),
    ("event_id", "VARCHAR"),
    ("ts", "TIMESTAMP"),
    ("model_name", "VARCHAR"),
    ("plan_id", "VARCHAR"),
    ("shard_type", "VARCHAR"),
    ("num_shards", "INTEGER"),
    ("coordinator_id", "VARCHAR"),
    ("latency_ms", "DOUBLE"),
    ("kernel_ms", "DOUBLE"),
    ("attempts", "INTEGER"),
    ("outcome", "VARCHAR"),
    ("error", "VARCHAR"),
    ("recorded_at", "TIMESTAMP"),
)
COMPONENT_COLUMNS = (
    ("event_id", "VARCHAR"),
    ("ts", "TIMESTAMP"),
    ("request_id", "VARCHAR"),
    ("model_name", "VARCHAR"),
    ("plan_id", "VARCHAR"),
    ("shard_index", "INTEGER"),
    ("shard_type", "VARCHAR"),
    ("worker_id", "VARCHAR"),
    ("browser", "VARCHAR"),
    ("platform", "VARCHAR"),
    ("adapter", "VARCHAR"),
    ("kernel_ms", "DOUBLE"),
    ("queue_ms", "DOUBLE"),
    ("transfer_ms", "DOUBLE"),
    ("bytes_in", "BIGINT"),
    ("bytes_out", "BIGINT"),
    ("attempt", "INTEGER"),
    ("outcome", "VARCHAR"),
    ("error", "VARCHAR"),
    ("recorded_at", "TIMESTAMP"),
)
RECOVERY_COLUMNS = (
    ("event_id", "VARCHAR"),
    ("ts", "TIMESTAMP"),
    ("request_id", "VARCHAR"),
    ("model_name", "VARCHAR"),
    ("plan_id", "VARCHAR"),
    ("shard_index", "INTEGER"),
    ("worker_id", "VARCHAR"),
    ("browser", "VARCHAR"),
    ("platform", "VARCHAR"),
    ("failure", "VARCHAR"),
    ("action", "VARCHAR"),
    ("success", "BOOLEAN"),
    ("duration_ms", "DOUBLE"),
    ("error", "VARCHAR"),
    ("recorded_at", "TIMESTAMP"),
)
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "model_sharding_history": HISTORY_COLUMNS,
    "model_sharding_components": COMPONENT_COLUMNS,
    "model_sharding_recovery_events": RECOVERY_COLUMNS,
}
METRICS_TABLE = "model_sharding_browser_metrics"
SCHEMA = [
    *(
        f"CREATE TABLE IF NOT EXISTS {name} ("
        + ", ".join(
            f"{c} {t}" + (" PRIMARY KEY" if k == 0 else " NOT NULL" if c in ("ts", "model_name") else "")
            for k, (c, t) in enumerate(cols)
        )
        + (", UNIQUE (event_id))" if name == "model_sharding_history" else ")")
        for name, cols in TABLES.items()
    ),
    f"""CREATE TABLE IF NOT EXISTS {METRICS_TABLE} (
        model_name VARCHAR, shard_type VARCHAR, browser VARCHAR, platform VARCHAR,
        execution_count BIGINT, success_count BIGINT, error_count BIGINT, success_rate DOUBLE,
        total_latency_ms DOUBLE, avg_kernel_ms DOUBLE, p50_kernel_ms DOUBLE, p95_kernel_ms DOUBLE,
        avg_queue_ms DOUBLE, avg_transfer_ms DOUBLE, first_ts TIMESTAMP, last_ts TIMESTAMP, updated_at TIMESTAMP,
        PRIMARY KEY (model_name, shard_type, browser, platform))""",
]
REFRESH_METRICS = f"""
    INSERT INTO {METRICS_TABLE}
    SELECT model_name, shard_type, browser, platform,
           count(*), count(*) FILTER (outcome = 'success'), count(*) FILTER (outcome <> 'success'),
           count(*) FILTER (outcome = 'success') / count(*),
           coalesce(sum(kernel_ms) FILTER (outcome = 'success'), 0),
           coalesce(avg(kernel_ms) FILTER (outcome = 'success'), 0),
           coalesce(quantile_cont(kernel_ms, 0.5) FILTER (outcome = 'success'), 0),
           coalesce(quantile_cont(kernel_ms, 0.95) FILTER (outcome = 'success'), 0),
           avg(queue_ms), avg(transfer_ms), min(ts), max(ts), ?::TIMESTAMP
    FROM model_sharding_components WHERE model_name IN (SELECT unnest(?::VARCHAR[]))
    GROUP BY model_name, shard_type, browser, platform"""
MODELS_SQL = """
    WITH m AS (SELECT model_name, ts FROM model_sharding_history UNION ALL
               SELECT model_name, ts FROM model_sharding_components UNION ALL
               SELECT model_name, ts FROM model_sharding_recovery_events)
    SELECT model_name,
           (SELECT count(*) FROM model_sharding_history h WHERE h.model_name = m.model_name) AS requests,
           (SELECT count(*) FROM model_sharding_components c WHERE c.model_name = m.model_name) AS executions,
           (SELECT count(*) FROM model_sharding_recovery_events r WHERE r.model_name = m.model_name) AS recoveries,
           epoch_ms(min(ts)) AS first_ms, epoch_ms(max(ts)) AS last_ms
    FROM m GROUP BY model_name ORDER BY max(ts) DESC"""
COUNTERS = """count(*) AS execution_count, count(*) FILTER (outcome = 'success') AS success_count,
    count(*) FILTER (outcome <> 'success') AS error_count,
    coalesce(sum({lat}) FILTER (outcome = 'success'), 0) AS total_latency,
    coalesce(quantile_cont({lat}, 0.5) FILTER (outcome = 'success'), 0) AS p50_latency,
    coalesce(quantile_cont({lat}, 0.95) FILTER (outcome = 'success'), 0) AS p95_latency"""


def utc(ts_ms: float) -> datetime:
    """A naive UTC datetime; ValueError for a timestamp no datetime can hold (NaN, out of range)."""
    try:
        return datetime.fromtimestamp(ts_ms / 1000.0, UTC).replace(tzinfo=None)
    except (OverflowError, OSError) as e:
        raise ValueError(f"timestamp {ts_ms!r} ms is out of range") from e


def event_row(event: Event, recorded_at: datetime) -> tuple[str, tuple[Any, ...]]:
    """The table and row of one event; ValueError/TypeError if a field has the wrong type."""
    e: Any = event
    if isinstance(event, RequestEvent):
        return "model_sharding_history", (
            str(e.request_id),
            str(e.event_id),
            utc(float(e.ts_ms)),
            str(e.model_name),
            str(e.plan_id),
            str(e.shard_type),
            int(e.num_shards),
            str(e.coordinator_id),
            float(e.latency_ms),
            float(e.kernel_ms),
            int(e.attempts),
            str(e.outcome),
            str(e.error),
            recorded_at,
        )
    if isinstance(event, ExecutionEvent):
        return "model_sharding_components", (
            str(e.event_id),
            utc(float(e.ts_ms)),
            str(e.request_id),
            str(e.model_name),
            str(e.plan_id),
            int(e.shard_index),
            str(e.shard_type),
            str(e.worker_id),
            str(e.browser),
            str(e.platform),
            str(e.adapter),
            float(e.kernel_ms),
            float(e.queue_ms),
            float(e.transfer_ms),
            int(e.bytes_in),
            int(e.bytes_out),
            int(e.attempt),
            str(e.outcome),
            str(e.error),
            recorded_at,
        )
    if isinstance(event, RecoveryEvent):
        if not isinstance(e.success, bool):
            raise TypeError(f"recovery event {e.event_id}: success must be a bool, got {e.success!r}")
        return "model_sharding_recovery_events", (
            str(e.event_id),
            utc(float(e.ts_ms)),
            str(e.request_id),
            str(e.model_name),
            str(e.plan_id),
            int(e.shard_index),
            str(e.worker_id),
            str(e.browser),
            str(e.platform),
            str(e.failure),
            str(e.action),
            e.success,
            float(e.duration_ms),
            str(e.error),
            recorded_at,
        )
    raise TypeError(f"not a history event: {type(event).__name__}")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch added; ``duplicates`` were already in the database (redelivered)."""

    requests: int = 0
    executions: int = 0
    recoveries: int = 0
    duplicates: int = 0

    @property
    def written(self) -> int:
        return self.requests + self.executions + self.recoveries


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


class HistoryStore:
    """The DuckDB history file. Thread-safe; async callers use ``asyncio.to_thread``."""

    def __init__(self, db_path: str | Path, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self.db_path = Path(db_path)
        self.lock_wait_s = lock_wait_s
        self._lock = threading.Lock()

    @property
    def exists(self) -> bool:
        return self.db_path.is_file()

    @contextmanager
    def _connect(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + self.lock_wait_s
        delay_s = 0.02
        with self._lock:
            while True:
                try:
                    con = duckdb.connect(str(self.db_path), read_only=read_only)
                    break
                except duckdb.Error as e:
                    if not _is_lock_conflict(e) or time.monotonic() > deadline:
                        raise HistoryError(f"cannot open history database {self.db_path}: {e}") from e
                    time.sleep(delay_s)
                    delay_s = min(delay_s * 2, 0.25)
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
            0,
        )
        return WriteResult(result.requests, result.executions, result.recoveries, total - result.written)

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
        with self._connect(read_only=True) as con:
            have = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            yield Reader(con if {*TABLES, METRICS_TABLE} <= have else None)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, read-only; ``[]`` if the database or its tables do not exist yet."""
        with self.reading() as r:
            return r.rows(sql, params)

    def models(self) -> list[dict[str, Any]]:
        """Every model with history, most recently active first: requests, executions, recoveries,
        first and last activity (epoch ms)."""
        return self.query(MODELS_SQL)

    def browser_stats(
        self, model_name: str, shard_type: str | None = None, *, by_shard: bool = False, plan_id: str | None = None
    ) -> list[BrowserStat]:
        """Per shard type and browser+platform (from the metrics table); with ``by_shard``, per shard index
        too (from the components, of ``plan_id`` if given)."""
        if not by_shard:
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
            return _model_history(r, model_name, plan_id, timeline_length)


def _model_history(r: Reader, model_name: str, plan_id: str | None, timeline_length: int) -> dict[str, Any]:
    exec_counters = COUNTERS.format(lat="kernel_ms")
    comps = r.rows(
        f"""
        SELECT shard_index, {exec_counters}, arg_max(browser, ts) AS browser,
               arg_max(platform, ts) AS platform, arg_max(shard_type, ts) AS shard_type
        FROM model_sharding_components WHERE model_name = ? AND (?::VARCHAR IS NULL OR plan_id = ?)
        GROUP BY shard_index ORDER BY shard_index""",
        [model_name, plan_id, plan_id],
    )
    history: dict[str, Any] = {"components": {f"shard_{c['shard_index']}": counters(c) for c in comps}}
    for section, key in (
        ("browser_metrics", "browser"),
        ("platform_metrics", "platform"),
        ("browser_platform_metrics", "browser || '/' || platform"),
        ("shard_types", "shard_type"),
    ):
        rows = r.rows(
            f"SELECT {key} AS k, {exec_counters} FROM model_sharding_components WHERE model_name = ? "
            "GROUP BY k ORDER BY k",
            [model_name],
        )
        history[section] = {row.pop("k"): counters(row) for row in rows}
    overall = r.rows(
        f"SELECT {COUNTERS.format(lat='latency_ms')} FROM model_sharding_history WHERE model_name = ?", [model_name]
    )
    history["overall_metrics"] = counters(overall[0] if overall else {})
    recent = r.rows(
        """SELECT epoch_ms(ts) AS ms, request_id, outcome, latency_ms, error FROM model_sharding_history
                       WHERE model_name = ? ORDER BY ts DESC LIMIT ?""",
        [model_name, timeline_length],
    )
    history["timeline"] = [
        {
            "timestamp": t["ms"] / 1000.0,
            "request_id": t["request_id"],
            "success": t["outcome"] == "success",
            "latency_ms": round(t["latency_ms"], 3),
            **({"error": t["error"]} if t["error"] else {}),
        }
        for t in reversed(recent)
    ]
    history["recovery_events"] = [
        {"timestamp": e.pop("ms") / 1000.0, **e}
        for e in r.rows(
            """
            SELECT epoch_ms(ts) AS ms, event_id, request_id, plan_id, shard_index, worker_id, browser, platform,
                   failure, action, success, duration_ms, error
            FROM model_sharding_recovery_events WHERE model_name = ? ORDER BY ts""",
            [model_name],
        )
    ]
    return history


def counters(row: dict[str, Any]) -> dict[str, Any]:
    """The live counters' shape (coordinator/metrics.py ``Counter.as_dict``) plus any extra columns."""
    runs, ok = int(row.pop("execution_count", 0) or 0), int(row.pop("success_count", 0) or 0)
    total = float(row.pop("total_latency", 0.0) or 0.0)
    return {
        "success_count": ok,
        "error_count": int(row.pop("error_count", 0) or 0),
        "total_latency": round(total, 3),
        "execution_count": runs,
        "success_rate": ok / runs if runs else 0.0,
        "avg_latency": total / ok if ok else 0.0,
        "p50_latency": float(row.pop("p50_latency", 0.0) or 0.0),
        "p95_latency": float(row.pop("p95_latency", 0.0) or 0.0),
        **row,
    }


def merge_counters(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two counter dicts over disjoint executions: counts and totals add up; p50/p95 are the
    success-weighted means of the two (exact when one side is empty); other keys from ``b``."""
    ok_a, ok_b = a.get("success_count", 0), b.get("success_count", 0)
    merged = {**a, **b}
    for k in ("success_count", "error_count", "execution_count"):
        merged[k] = a.get(k, 0) + b.get(k, 0)
    merged["total_latency"] = round(a.get("total_latency", 0.0) + b.get("total_latency", 0.0), 3)
    runs, ok = merged["execution_count"], merged["success_count"]
    merged["success_rate"] = ok / runs if runs else 0.0
    merged["avg_latency"] = merged["total_latency"] / ok if ok else 0.0
    for k in ("p50_latency", "p95_latency"):
        merged[k] = (a.get(k, 0.0) * ok_a + b.get(k, 0.0) * ok_b) / ok if ok else 0.0
    return merged


def merge_history(
    prior: dict[str, Any], live: dict[str, Any], timeline_length: int = TIMELINE_LENGTH
) -> dict[str, Any]:
    """The database's history as it was before this manager started (``prior``) plus this manager's
    live counters (``live``). Pure; the two must not overlap (take ``prior`` before the first request)."""
    out: dict[str, Any] = {}
    for section in ("components", "browser_metrics", "platform_metrics", "browser_platform_metrics", "shard_types"):
        a, b = prior.get(section, {}), live.get(section, {})
        out[section] = {k: merge_counters(a.get(k, {}), b.get(k, {})) for k in sorted({*a, *b})}
    out["overall_metrics"] = merge_counters(prior.get("overall_metrics", {}), live.get("overall_metrics", {}))
    out["timeline"] = [*prior.get("timeline", []), *live.get("timeline", [])][-timeline_length:]
    out["recovery_events"] = [*prior.get("recovery_events", []), *live.get("recovery_events", [])]
    return out


__all__ = ["BrowserStat", "HistoryError", "HistoryStore", "WriteResult", "merge_history"]
