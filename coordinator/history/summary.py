"""The guide's ``get_performance_history()`` structure, read from the history tables and merged with the
live counters of a running manager. Reads go through any ``Rows`` (``store.Reader``); merging is pure.

Every counter has the shape of the live counters (``coordinator.runtime.metrics.Counter.as_dict``):
``success_count``, ``error_count``, ``total_latency``, ``execution_count``, ``success_rate``,
``avg_latency``, ``p50_latency``, ``p95_latency``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

TIMELINE_LENGTH = 1000
SECTIONS = ("components", "browser_metrics", "platform_metrics", "browser_platform_metrics", "shard_types")

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
_EXECUTION_COUNTERS = COUNTERS.format(lat="kernel_ms")
# section -> the column (or expression) its counters are grouped by
_GROUPED = (
    ("browser_metrics", "browser"),
    ("platform_metrics", "platform"),
    ("browser_platform_metrics", "browser || '/' || platform"),
    ("shard_types", "coalesce(nullif(kind, ''), shard_type)"),  # by kind (attention, vision, ...) where shards have one
)


class Rows(Protocol):
    def rows(self, sql: str, params: Sequence[Any] = ...) -> list[dict[str, Any]]: ...


def read_model_history(r: Rows, model_name: str, plan_id: str | None, timeline_length: int) -> dict[str, Any]:
    """The structure for ``model_name`` (components of ``plan_id`` only, if given); empty sections when
    there is no history."""
    history: dict[str, Any] = {"components": _components(r, model_name, plan_id)}
    for section, key in _GROUPED:
        rows = r.rows(
            f"SELECT {key} AS k, {_EXECUTION_COUNTERS} FROM model_sharding_components WHERE model_name = ? "
            "GROUP BY k ORDER BY k",
            [model_name],
        )
        history[section] = {row.pop("k"): counters(row) for row in rows}
    overall = r.rows(
        f"SELECT {COUNTERS.format(lat='latency_ms')} FROM model_sharding_history WHERE model_name = ?", [model_name]
    )
    history["overall_metrics"] = counters(overall[0] if overall else {})
    history["timeline"] = _timeline(r, model_name, timeline_length)
    history["recovery_events"] = _recovery_events(r, model_name)
    return history


def _components(r: Rows, model_name: str, plan_id: str | None) -> dict[str, Any]:
    comps = r.rows(
        f"""
        SELECT shard_index, {_EXECUTION_COUNTERS}, arg_max(browser, ts) AS browser,
               arg_max(platform, ts) AS platform, arg_max(shard_type, ts) AS shard_type, arg_max(kind, ts) AS kind
        FROM model_sharding_components WHERE model_name = ? AND (?::VARCHAR IS NULL OR plan_id = ?)
        GROUP BY shard_index ORDER BY shard_index""",
        [model_name, plan_id, plan_id],
    )
    return {f"shard_{c['shard_index']}": counters(c) for c in comps}


def _timeline(r: Rows, model_name: str, timeline_length: int) -> list[dict[str, Any]]:
    recent = r.rows(
        """SELECT epoch_ms(ts) AS ms, request_id, outcome, latency_ms, error FROM model_sharding_history
                       WHERE model_name = ? ORDER BY ts DESC LIMIT ?""",
        [model_name, timeline_length],
    )
    return [
        {
            "timestamp": t["ms"] / 1000.0,
            "request_id": t["request_id"],
            "success": t["outcome"] == "success",
            "latency_ms": round(t["latency_ms"], 3),
            **({"error": t["error"]} if t["error"] else {}),
        }
        for t in reversed(recent)
    ]


def _recovery_events(r: Rows, model_name: str) -> list[dict[str, Any]]:
    return [
        {"timestamp": e.pop("ms") / 1000.0, **e}
        for e in r.rows(
            """
            SELECT epoch_ms(ts) AS ms, event_id, request_id, plan_id, shard_index, worker_id, browser, platform,
                   failure, action, success, duration_ms, error
            FROM model_sharding_recovery_events WHERE model_name = ? ORDER BY ts""",
            [model_name],
        )
    ]


def counter_shape(
    success_count: int, error_count: int, total_latency: float, execution_count: int, p50: float, p95: float
) -> dict[str, Any]:
    """One counter in the guide's shape; the live counters (``Counter.as_dict``) and the database's use it."""
    return {
        "success_count": success_count,
        "error_count": error_count,
        "total_latency": round(total_latency, 3),
        "execution_count": execution_count,
        "success_rate": success_count / execution_count if execution_count else 0.0,
        "avg_latency": total_latency / success_count if success_count else 0.0,
        "p50_latency": p50,
        "p95_latency": p95,
    }


def counters(row: dict[str, Any]) -> dict[str, Any]:
    """A row of ``COUNTERS`` columns in the counter shape, plus any extra columns."""
    runs, ok = int(row.pop("execution_count", 0) or 0), int(row.pop("success_count", 0) or 0)
    total = float(row.pop("total_latency", 0.0) or 0.0)
    errors = int(row.pop("error_count", 0) or 0)
    p50, p95 = float(row.pop("p50_latency", 0.0) or 0.0), float(row.pop("p95_latency", 0.0) or 0.0)
    return {**counter_shape(ok, errors, total, runs, p50, p95), **row}


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
    for section in SECTIONS:
        a, b = prior.get(section, {}), live.get(section, {})
        out[section] = {k: merge_counters(a.get(k, {}), b.get(k, {})) for k in sorted({*a, *b})}
    out["overall_metrics"] = merge_counters(prior.get("overall_metrics", {}), live.get("overall_metrics", {}))
    out["timeline"] = [*prior.get("timeline", []), *live.get("timeline", [])][-timeline_length:]
    out["recovery_events"] = [*prior.get("recovery_events", []), *live.get("recovery_events", [])]
    return out
