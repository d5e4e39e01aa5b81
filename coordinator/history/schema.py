"""The history database's five tables, and how an event becomes a row. Pure: no connection here.

Tables (``ts`` is when the event happened, UTC; ``recorded_at`` when it was written)::

    model_sharding_history            one row per request      PK request_id, UNIQUE event_id
    model_sharding_components         one row per shard run    PK event_id; ``kind`` is what the shard
                                      holds ("attention", "vision", ...; "" for layer shards)
    model_sharding_recovery_events    one row per recovery     PK event_id
    model_sharding_precision          one row per shard and precision measured (or asked for)   PK event_id
    model_sharding_browser_metrics    per (model_name, shard_type, browser, platform), recomputed from
                                      the components of the models each batch touched (``REFRESH_METRICS``)

``event_row(event, recorded_at)`` is the one mapping from a ``RequestEvent``, ``ExecutionEvent``,
``RecoveryEvent`` or ``PrecisionEvent`` to its table and row; it raises ``TypeError``/``ValueError`` for a
field of the wrong type, so a bad event is refused before the database is touched.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from broker.messages import Event, ExecutionEvent, PrecisionEvent, RecoveryEvent, RequestEvent

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
    ("kind", "VARCHAR"),  # last: where ``MIGRATIONS`` adds it to a database from before it
    ("dtype", "VARCHAR"),  # after it, for the same reason
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
PRECISION_COLUMNS = (
    ("event_id", "VARCHAR"),
    ("ts", "TIMESTAMP"),
    ("model_name", "VARCHAR"),
    ("plan_id", "VARCHAR"),
    ("shard_index", "INTEGER"),
    ("dtype", "VARCHAR"),
    ("measured", "VARCHAR"),
    ("top1", "DOUBLE"),
    ("max_diff", "DOUBLE"),
    ("relative_diff", "DOUBLE"),
    ("positions", "INTEGER"),
    ("reason", "VARCHAR"),
    ("recorded_at", "TIMESTAMP"),
)
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "model_sharding_history": HISTORY_COLUMNS,
    "model_sharding_components": COMPONENT_COLUMNS,
    "model_sharding_recovery_events": RECOVERY_COLUMNS,
    "model_sharding_precision": PRECISION_COLUMNS,
}
METRICS_TABLE = "model_sharding_browser_metrics"
# Columns added after a table was first released; ``SCHEMA`` runs them on every open for writing.
MIGRATIONS = (
    "ALTER TABLE model_sharding_components ADD COLUMN IF NOT EXISTS kind VARCHAR DEFAULT ''",
    "ALTER TABLE model_sharding_components ADD COLUMN IF NOT EXISTS dtype VARCHAR DEFAULT ''",
)
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
    *MIGRATIONS,
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


def utc(ts_ms: float) -> datetime:
    """A naive UTC datetime; ValueError for a timestamp no datetime can hold (NaN, out of range)."""
    try:
        return datetime.fromtimestamp(ts_ms / 1000.0, UTC).replace(tzinfo=None)
    except (OverflowError, OSError) as e:
        raise ValueError(f"timestamp {ts_ms!r} ms is out of range") from e


def event_row(event: Event, recorded_at: datetime) -> tuple[str, tuple[Any, ...]]:
    """The table and row of one event; ValueError/TypeError if a field has the wrong type."""
    if isinstance(event, RequestEvent):
        return "model_sharding_history", _request_row(event, recorded_at)
    if isinstance(event, ExecutionEvent):
        return "model_sharding_components", _execution_row(event, recorded_at)
    if isinstance(event, RecoveryEvent):
        return "model_sharding_recovery_events", _recovery_row(event, recorded_at)
    if isinstance(event, PrecisionEvent):
        return "model_sharding_precision", _precision_row(event, recorded_at)
    raise TypeError(f"not a history event: {type(event).__name__}")


def _request_row(e: Any, recorded_at: datetime) -> tuple[Any, ...]:
    return (
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


def _execution_row(e: Any, recorded_at: datetime) -> tuple[Any, ...]:
    return (
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
        str(e.kind),
        str(e.dtype),
    )


def _recovery_row(e: Any, recorded_at: datetime) -> tuple[Any, ...]:
    if not isinstance(e.success, bool):
        raise TypeError(f"recovery event {e.event_id}: success must be a bool, got {e.success!r}")
    return (
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


def _precision_row(e: Any, recorded_at: datetime) -> tuple[Any, ...]:
    def figure(value: Any) -> float | None:
        number = float(value)
        return None if math.isnan(number) else number

    return (
        str(e.event_id),
        utc(float(e.ts_ms)),
        str(e.model_name),
        str(e.plan_id),
        int(e.shard_index),
        str(e.dtype),
        str(e.measured),
        figure(e.top1),
        figure(e.max_diff),
        figure(e.relative_diff),
        int(e.positions),
        str(e.reason),
        recorded_at,
    )
