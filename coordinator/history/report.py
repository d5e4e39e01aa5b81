"""Looking at the history: the ``xshard history`` tables (here) and the ``xshard report`` HTML page
(``html_report``, re-exported with the data both read, ``report_data``).

``print_history(db_path, model, recent)`` returns aligned text tables per model: requests, per browser and
platform, per shard, recent recovery events, recent requests and the recommendations the measurements
support.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.history.html_report import render_html, write_html_report
from coordinator.history.report_data import (
    BROWSER_HEADERS,
    KIND_HEADERS,
    RECENT,
    ModelData,
    NoHistory,
    browser_rows,
    kind_rows,
    load,
    pct,
    when,
)
from coordinator.planning.recommendations import recommend


def is_number(cell: Any) -> bool:
    if isinstance(cell, int | float):
        return True
    try:
        float(str(cell))
    except ValueError:
        return False
    return True


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Aligned columns: numeric columns right-aligned, the others left-aligned; no trailing padding."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    numeric = [bool(rows) and all(is_number(row[i]) for row in rows) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(r)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def print_history(db_path: str | Path, model: str | None = None, recent: int = RECENT) -> str:
    """The tables people need, as text (the caller prints it). Raises NoHistory."""
    models = load(db_path, model, recent)
    head = f"history {db_path}: {len(models)} model(s)"
    return "\n\n".join([head, *(_model_text(m, recent) for m in models)])


def _model_text(m: ModelData, recent: int) -> str:
    q = m.requests
    share = (
        f", {pct(q['ok'] / q['total'])}), latency p50 {q['p50']:.1f} ms, p95 {q['p95']:.1f} ms end to end"
        if q["total"]
        else ""
    )
    lines = [
        f"model {m.name}",
        f"  requests  {q['total']} ({q['ok']} ok, {q['total'] - q['ok']} failed" + (share or ")"),
        f"  span      {when(m.summary['first_ms'])} .. {when(m.summary['last_ms'])} UTC",
        "",
        "per browser and platform (kernel latency of successful shard executions)",
        _browser_table(m),
        "",
        *(["per kind of shard", _kind_table(m), ""] if m.kinds else []),
        "per shard",
        _shard_table(m),
        "",
        *_recovery_lines(m, recent),
        "",
        f"recent requests ({len(m.recent_requests)} of {q['total']})",
        _request_table(m),
    ]
    rec = recommend(m.stats, {}, "")
    if rec:
        lines += ["", "recommendation (from these measurements)"]
        lines += [f"  {k}: {v['reason']}" for k, v in rec["browser_allocation"].items()]
        lines += [f"  - {s['issue']}: {s['suggestion']}" for s in rec["optimization_suggestions"]]
    return "\n".join(lines)


def _browser_table(m: ModelData) -> str:
    return format_table(BROWSER_HEADERS, browser_rows(m, _ms))


def _kind_table(m: ModelData) -> str:
    return format_table(KIND_HEADERS, kind_rows(m, _ms))


def _ms(x: float) -> str:
    return f"{x:.2f}"


def _shard_table(m: ModelData) -> str:
    return format_table(
        ("shard", "shard type", "kind", "browser", "platform", "runs", "success", "p50 ms", "p95 ms"),
        [
            (
                s.shard_index,
                s.shard_type,
                s.kind,
                s.browser,
                s.platform,
                s.runs,
                pct(s.success_rate),
                f"{s.p50_kernel_ms:.2f}",
                f"{s.p95_kernel_ms:.2f}",
            )
            for s in m.shards
        ],
    )


def _recovery_lines(m: ModelData, recent: int) -> list[str]:
    shown = m.recoveries[-recent:]
    head = f"recent recovery events ({len(shown)} of {len(m.recoveries)})"
    if not shown:
        return [head, "  none recorded"]
    table = format_table(
        ("time UTC", "request", "shard", "browser", "platform", "failure", "action", "ok", "ms", "error"),
        [
            (
                when(e["ms"], "%H:%M:%S"),
                e["request_id"][:12],
                e["shard_index"],
                e["browser"],
                e["platform"],
                e["failure"],
                e["action"],
                "yes" if e["success"] else "no",
                f"{e['duration_ms']:.0f}",
                (e["error"] or "")[:60],
            )
            for e in reversed(shown)
        ],
    )
    return [head, table]


def _request_table(m: ModelData) -> str:
    return format_table(
        ("time UTC", "request", "outcome", "latency ms", "kernel ms", "attempts", "error"),
        [
            (
                when(r["ms"], "%H:%M:%S"),
                r["request_id"][:12],
                r["outcome"],
                f"{r['latency_ms']:.1f}",
                f"{r['kernel_ms']:.1f}",
                r["attempts"],
                (r["error"] or "")[:60],
            )
            for r in m.recent_requests
        ],
    )


__all__ = [
    "ModelData",
    "NoHistory",
    "format_table",
    "is_number",
    "load",
    "print_history",
    "render_html",
    "write_html_report",
]
