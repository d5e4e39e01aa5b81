"""What the history reports show, read from the database in one read-only connection per call.

``load(db_path, model, recent)`` gives one ``ModelData`` per model (most recently active first): request
totals and percentiles, the per-browser metrics table, per-shard statistics, recovery events, the most
recent requests and the points the plots draw. The text report (``report``) and the HTML page
(``html_report``) format it; the small formatting helpers both use live here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.history.schema import METRICS_TABLE
from coordinator.history.store import HistoryError, HistoryStore, Reader
from coordinator.history.summary import MODELS_SQL
from coordinator.planning.recommendations import BrowserStat

RECENT = 10
MAX_POINTS = 5000


class NoHistory(HistoryError):
    """The database does not exist, or holds nothing for the model asked for."""


@dataclass
class ModelData:
    name: str
    summary: dict[str, Any]
    requests: dict[str, Any]
    browsers: list[dict[str, Any]]
    shards: list[BrowserStat]
    recoveries: list[dict[str, Any]]
    recent_requests: list[dict[str, Any]]
    executions: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    kinds: list[BrowserStat] = field(default_factory=list)  # per kind of shard (attention, vision, ...)

    @property
    def stats(self) -> list[BrowserStat]:
        """Per shard type (the metrics table), then per kind of shard."""
        return [
            BrowserStat(
                b["browser"],
                b["platform"],
                b["execution_count"],
                b["success_count"],
                b["p50_kernel_ms"],
                b["p95_kernel_ms"],
                b["avg_kernel_ms"],
                self.name,
                b["shard_type"],
            )
            for b in self.browsers
        ] + self.kinds


def short(model: str) -> str:
    return Path(model).name if "/" in model else model


def when(ms: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000.0, UTC).strftime(fmt)


def _load_model(r: Reader, summary: dict[str, Any], recent: int) -> ModelData:
    name = summary["model_name"]
    requests = r.rows(
        """
        SELECT count(*) AS total, count(*) FILTER (outcome = 'success') AS ok,
               coalesce(quantile_cont(latency_ms, 0.5) FILTER (outcome = 'success'), 0) AS p50,
               coalesce(quantile_cont(latency_ms, 0.95) FILTER (outcome = 'success'), 0) AS p95
        FROM model_sharding_history WHERE model_name = ?""",
        [name],
    )[0]
    browsers = r.rows(
        f"SELECT * EXCLUDE (model_name) FROM {METRICS_TABLE} WHERE model_name = ? "
        "ORDER BY shard_type, browser, platform",
        [name],
    )
    shards = [
        BrowserStat(**row)
        for row in r.rows(
            """
        SELECT browser, platform, count(*) AS runs, count(*) FILTER (outcome = 'success') AS successes,
               coalesce(quantile_cont(kernel_ms, 0.5) FILTER (outcome = 'success'), 0) AS p50_kernel_ms,
               coalesce(quantile_cont(kernel_ms, 0.95) FILTER (outcome = 'success'), 0) AS p95_kernel_ms,
               coalesce(avg(kernel_ms) FILTER (outcome = 'success'), 0) AS avg_kernel_ms,
               model_name, shard_type, shard_index, kind
        FROM model_sharding_components WHERE model_name = ?
        GROUP BY ALL ORDER BY shard_type, shard_index, browser, platform""",
            [name],
        )
    ]
    kinds = _kind_stats(r, name)
    recoveries = r.rows(
        """
        SELECT epoch_ms(ts) AS ms, request_id, shard_index, worker_id, browser, platform, failure, action,
               success, duration_ms, error
        FROM model_sharding_recovery_events WHERE model_name = ? ORDER BY ts""",
        [name],
    )
    recent_requests = r.rows(
        """
        SELECT epoch_ms(ts) AS ms, request_id, outcome, latency_ms, kernel_ms, attempts, error
        FROM model_sharding_history WHERE model_name = ? ORDER BY ts DESC LIMIT ?""",
        [name, recent],
    )
    executions = r.rows(
        """
        SELECT * FROM (SELECT epoch_ms(ts) AS ms, browser, platform, shard_index, kernel_ms, outcome, request_id
                       FROM model_sharding_components WHERE model_name = ? ORDER BY ts DESC LIMIT ?)
        ORDER BY ms""",
        [name, MAX_POINTS],
    )
    timeline = r.rows(
        """
        SELECT * FROM (SELECT epoch_ms(ts) AS ms, request_id, outcome, latency_ms, attempts
                       FROM model_sharding_history WHERE model_name = ? ORDER BY ts DESC LIMIT ?)
        ORDER BY ms""",
        [name, MAX_POINTS],
    )
    return ModelData(
        name, summary, requests, browsers, shards, recoveries, recent_requests, executions, timeline, kinds
    )


def _kind_stats(r: Reader, name: str) -> list[BrowserStat]:
    """Per kind of shard (attention, vision, ...) and browser+platform; shards without a kind left out."""
    rows = r.rows(
        """
        SELECT browser, platform, count(*) AS runs, count(*) FILTER (outcome = 'success') AS successes,
               coalesce(quantile_cont(kernel_ms, 0.5) FILTER (outcome = 'success'), 0) AS p50_kernel_ms,
               coalesce(quantile_cont(kernel_ms, 0.95) FILTER (outcome = 'success'), 0) AS p95_kernel_ms,
               coalesce(avg(kernel_ms) FILTER (outcome = 'success'), 0) AS avg_kernel_ms,
               model_name, shard_type, NULL AS shard_index, kind
        FROM model_sharding_components WHERE model_name = ? AND kind <> ''
        GROUP BY ALL ORDER BY shard_type, kind, browser, platform""",
        [name],
    )
    return [BrowserStat(**row) for row in rows]


def load(db_path: str | Path, model: str | None = None, recent: int = RECENT) -> list[ModelData]:
    """Everything the report shows, per model (most recently active first). Raises NoHistory."""
    store = HistoryStore(db_path)
    if not store.exists:
        raise NoHistory(f"no history database at {db_path} (the history writer creates it)")
    with store.reading() as r:
        models = r.rows(MODELS_SQL)
        chosen = [m for m in models if model is None or m["model_name"] == model]
        if not chosen:
            known = ", ".join(m["model_name"] for m in models) or "none"
            what = f"model {model!r}" if model else "any model"
            raise NoHistory(f"{db_path} holds no history for {what} (models: {known})")
        return [_load_model(r, m, recent) for m in chosen]


def pct(x: float) -> str:
    return f"{x:.1%}"


BROWSER_HEADERS = ("shard type", "browser", "platform", "runs", "success", "p50 ms", "p95 ms", "avg ms", "errors")
KIND_HEADERS = ("kind", "shard type", "browser", "platform", "runs", "success", "p50 ms", "p95 ms")


def browser_rows(m: ModelData, ms: Callable[[float], Any]) -> list[tuple[Any, ...]]:
    """The per-browser-and-platform table's rows, milliseconds written by ``ms`` (text or HTML)."""
    return [
        (
            b["shard_type"],
            b["browser"],
            b["platform"],
            b["execution_count"],
            pct(b["success_rate"]),
            ms(b["p50_kernel_ms"]),
            ms(b["p95_kernel_ms"]),
            ms(b["avg_kernel_ms"]),
            b["error_count"],
        )
        for b in m.browsers
    ]


def kind_rows(m: ModelData, ms: Callable[[float], Any]) -> list[tuple[Any, ...]]:
    """The per-kind table's rows (what each shard holds), milliseconds written by ``ms``."""
    return [
        (
            s.kind,
            s.shard_type,
            s.browser,
            s.platform,
            s.runs,
            pct(s.success_rate),
            ms(s.p50_kernel_ms),
            ms(s.p95_kernel_ms),
        )
        for s in m.kinds
    ]
