"""``xshard report``: the history as one self-contained HTML page.

The page has inline CSS and inline SVG plots (``plots``), no scripts, and a Content-Security-Policy that
forbids loading anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.history.plots import PALETTE, bar_plot, e, latency_plot, recovery_plot
from coordinator.history.report_data import (
    BROWSER_HEADERS,
    KIND_HEADERS,
    ModelData,
    browser_rows,
    kind_rows,
    load,
    pct,
    short,
    when,
)
from coordinator.planning.recommendations import recommend

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:920px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} h3{font-size:15px;margin:18px 0 6px}
.meta{color:#666;margin:0} table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #e4e4e4;text-align:left} td.n,th.n{text-align:right}
svg.plot{background:#fafafa;border:1px solid #e4e4e4;border-radius:4px;max-width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#444} svg .label{font-size:12px;fill:#222}
svg .axis line{stroke:#888} svg line.grid{stroke:#e6e6e6} svg .series-line{fill:none;stroke-width:1;opacity:.35}
svg .error-point{stroke:#d62728;stroke-width:2} svg .request.ok{fill:#2ca02c} svg .request.error{fill:#d62728}
svg .marker line{stroke:#d62728;stroke-dasharray:4 3} svg .marker path{fill:#d62728}
svg .marker.success line{stroke:#ff7f0e} svg .marker.success path{fill:#ff7f0e} svg line.p95{stroke:#222}
svg .empty{font-size:13px;fill:#888} code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(tag: str, v: Any) -> str:
        cls = ' class="n"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
        return f"<{tag}{cls}>{e(v)}</{tag}>"

    if not rows:
        return '<p class="meta">none recorded</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _model_tables(m: ModelData) -> str:
    q = m.requests
    parts = [
        f"<h3>{e(m.name)}</h3>",
        f'<p class="meta">{q["total"]} requests ({q["ok"]} ok), end-to-end p50 {q["p50"]:.1f} ms, p95 '
        f"{q['p95']:.1f} ms; {when(m.summary['first_ms'])} .. {when(m.summary['last_ms'])} UTC</p>",
        _browser_table(m),
        *(["<h3>Per kind of shard</h3>", _kind_table(m)] if m.kinds else []),
        _shard_table(m),
        "<h3>Recovery events</h3>",
        _recovery_table(m),
        "<h3>Recent requests</h3>",
        _request_table(m),
    ]
    rec = recommend(m.stats, {}, "")
    if rec:
        items = [f"<li><b>{e(k)}</b>: {e(v['reason'])}</li>" for k, v in rec["browser_allocation"].items()]
        items += [f"<li>{e(s['issue'])}: {e(s['suggestion'])}</li>" for s in rec["optimization_suggestions"]]
        parts.append(f"<h3>Recommendations from these measurements</h3><ul>{''.join(items)}</ul>")
    return "".join(parts)


def _browser_table(m: ModelData) -> str:
    return table(BROWSER_HEADERS, browser_rows(m, _ms))


def _kind_table(m: ModelData) -> str:
    return table(KIND_HEADERS, kind_rows(m, _ms))


def _ms(x: float) -> float:
    return round(x, 2)


def _shard_table(m: ModelData) -> str:
    return table(
        ("shard", "kind", "browser", "platform", "runs", "success", "p50 ms", "p95 ms"),
        [
            (
                s.shard_index,
                s.kind,
                s.browser,
                s.platform,
                s.runs,
                pct(s.success_rate),
                round(s.p50_kernel_ms, 2),
                round(s.p95_kernel_ms, 2),
            )
            for s in m.shards
        ],
    )


def _recovery_table(m: ModelData) -> str:
    return table(
        ("time UTC", "request", "shard", "browser", "failure", "action", "ok", "ms", "error"),
        [
            (
                when(ev["ms"]),
                ev["request_id"][:12],
                ev["shard_index"],
                f"{ev['browser']}/{ev['platform']}",
                ev["failure"],
                ev["action"],
                "yes" if ev["success"] else "no",
                round(ev["duration_ms"]),
                ev["error"],
            )
            for ev in reversed(m.recoveries[-50:])
        ],
    )


def _request_table(m: ModelData) -> str:
    return table(
        ("time UTC", "request", "outcome", "latency ms", "kernel ms", "attempts", "error"),
        [
            (
                when(r["ms"]),
                r["request_id"][:12],
                r["outcome"],
                round(r["latency_ms"], 1),
                round(r["kernel_ms"], 1),
                r["attempts"],
                r["error"],
            )
            for r in m.recent_requests
        ],
    )


def _bar_rows(models: Sequence[ModelData], series: Callable[[ModelData, str, str], str]) -> list[dict[str, Any]]:
    """One bar per series: runs, success rate, and success-weighted p50/p95 kernel ms."""
    bars: dict[str, dict[str, Any]] = {}
    for m in models:
        for s in m.stats:
            key = series(m, s.browser, s.platform)
            b = bars.setdefault(key, {"series": key, "runs": 0, "ok": 0, "p50w": 0.0, "p95w": 0.0})
            b["runs"] += s.runs
            b["ok"] += s.successes
            b["p50w"] += s.p50_kernel_ms * s.successes
            b["p95w"] += s.p95_kernel_ms * s.successes
    return [
        {
            **b,
            "rate": b["ok"] / b["runs"] if b["runs"] else 0.0,
            "p50": b["p50w"] / b["ok"] if b["ok"] else 0.0,
            "p95": b["p95w"] / b["ok"] if b["ok"] else 0.0,
        }
        for _, b in sorted(bars.items())
    ]


def render_html(models: Sequence[ModelData], db_path: str | Path) -> str:
    several = len(models) > 1

    def series(m: ModelData, browser: str, platform: str) -> str:
        return f"{short(m.name)} · {browser}/{platform}" if several else f"{browser}/{platform}"

    points = [{**p, "series": series(m, p["browser"], p["platform"])} for m in models for p in m.executions]
    names = sorted(
        {p["series"] for p in points} | {series(m, b["browser"], b["platform"]) for m in models for b in m.browsers}
    )
    colors = {n: PALETTE[k % len(PALETTE)] for k, n in enumerate(names)}
    times = [p["ms"] for p in points] + [r["ms"] for m in models for r in [*m.timeline, *m.recoveries]]
    lo, hi = (min(times), max(times)) if times else (0.0, 1000.0)
    pad = max((hi - lo) * 0.03, 50.0)
    xr = (lo - pad, hi + pad)
    rows = _bar_rows(models, series)
    requests = [r for m in models for r in m.timeline]
    recoveries = [r for m in models for r in m.recoveries]
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "".join(
        [
            '<!doctype html><html lang="en"><head><meta charset="utf-8">',
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            f"<title>xshard history report</title><style>{CSS}</style></head><body>",
            f'<h1>xshard performance history</h1><p class="meta">{e(db_path)}: {len(models)} model(s), '
            f"{len(points)} shard executions shown, {len(requests)} requests, {len(recoveries)} recovery events; "
            f"generated {generated}</p>",
            "<h2>Kernel latency over time, per browser and platform</h2>",
            latency_plot(points, xr, colors),
            "<h2>Success rate per browser and platform</h2>",
            bar_plot("success-rate", "success rate", rows, colors, True),
            "<h2>Kernel latency per browser and platform (bar p50, whisker p95)</h2>",
            bar_plot("latency-by-browser", "kernel latency per browser", rows, colors, False),
            "<h2>Requests and recovery events</h2>",
            recovery_plot(requests, recoveries, xr),
            "<h2>Tables</h2>",
            *(_model_tables(m) for m in models),
            "</body></html>",
        ]
    )


def write_html_report(db_path: str | Path, out_path: str | Path, model: str | None = None) -> Path:
    """Write the self-contained HTML report; returns its path. Raises NoHistory, OSError."""
    models = load(db_path, model, recent=20)
    out = Path(out_path)
    out.write_text(render_html(models, db_path), encoding="utf-8")
    return out
