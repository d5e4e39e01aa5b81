"""Looking at the history: ``xshard history`` tables and the ``xshard report`` HTML page.

The HTML page is one self-contained file: inline CSS, inline SVG plots drawn here, no scripts and a
Content-Security-Policy that forbids loading anything. Plots and their marks have stable ids and
classes (``svg.plot#latency-over-time circle.point``, ``#success-rate rect.bar``,
``#latency-by-browser rect.bar``, ``#recovery-timeline circle.request`` and ``g.marker``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.history.store import METRICS_TABLE, MODELS_SQL, HistoryError, HistoryStore, Reader
from coordinator.planning.recommendations import BrowserStat, recommend

RECENT = 10
MAX_POINTS = 5000
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


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

    @property
    def stats(self) -> list[BrowserStat]:
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
        ]


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
               model_name, shard_type, shard_index
        FROM model_sharding_components WHERE model_name = ?
        GROUP BY ALL ORDER BY shard_type, shard_index, browser, platform""",
            [name],
        )
    ]
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
    return ModelData(name, summary, requests, browsers, shards, recoveries, recent_requests, executions, timeline)


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


# -- xshard history ---------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _model_text(m: ModelData, recent: int) -> str:
    q = m.requests
    lines = [
        f"model {m.name}",
        f"  requests  {q['total']} ({q['ok']} ok, {q['total'] - q['ok']} failed"
        + (
            f", {_pct(q['ok'] / q['total'])}), latency p50 {q['p50']:.1f} ms, p95 {q['p95']:.1f} ms end to end"
            if q["total"]
            else ")"
        ),
        f"  span      {when(m.summary['first_ms'])} .. {when(m.summary['last_ms'])} UTC",
        "",
        "per browser and platform (kernel latency of successful shard executions)",
        format_table(
            ("shard type", "browser", "platform", "runs", "success", "p50 ms", "p95 ms", "avg ms", "errors"),
            [
                (
                    b["shard_type"],
                    b["browser"],
                    b["platform"],
                    b["execution_count"],
                    _pct(b["success_rate"]),
                    f"{b['p50_kernel_ms']:.2f}",
                    f"{b['p95_kernel_ms']:.2f}",
                    f"{b['avg_kernel_ms']:.2f}",
                    b["error_count"],
                )
                for b in m.browsers
            ],
        ),
        "",
        "per shard",
        format_table(
            ("shard", "shard type", "browser", "platform", "runs", "success", "p50 ms", "p95 ms"),
            [
                (
                    s.shard_index,
                    s.shard_type,
                    s.browser,
                    s.platform,
                    s.runs,
                    _pct(s.success_rate),
                    f"{s.p50_kernel_ms:.2f}",
                    f"{s.p95_kernel_ms:.2f}",
                )
                for s in m.shards
            ],
        ),
        "",
    ]
    shown = m.recoveries[-recent:]
    lines.append(f"recent recovery events ({len(shown)} of {len(m.recoveries)})")
    if shown:
        lines.append(
            format_table(
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
        )
    else:
        lines.append("  none recorded")
    lines += ["", f"recent requests ({len(m.recent_requests)} of {q['total']})"]
    lines.append(
        format_table(
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
    )
    rec = recommend(m.stats, {}, "")
    if rec:
        lines += ["", "recommendation (from these measurements)"]
        lines += [f"  {k}: {v['reason']}" for k, v in rec["browser_allocation"].items()]
        lines += [f"  - {s['issue']}: {s['suggestion']}" for s in rec["optimization_suggestions"]]
    return "\n".join(lines)


def print_history(db_path: str | Path, model: str | None = None, recent: int = RECENT) -> str:
    """The tables people need, as text (the caller prints it). Raises NoHistory."""
    models = load(db_path, model, recent)
    head = f"history {db_path}: {len(models)} model(s)"
    return "\n\n".join([head, *(_model_text(m, recent) for m in models)])


# -- SVG ------------------------------------------------------------------------------------------

W, H = 880, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 44
TIME_STEPS_S = (
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    172800,
    604800,
)


def e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def tag(name: str, body: str = "", **attrs: Any) -> str:
    """``<name a="v">body</name>``; ``class_`` is written ``class``, ``data_x`` ``data-x``; values escaped."""
    text = "".join(f' {k.rstrip("_").replace("_", "-")}="{e(v)}"' for k, v in attrs.items() if v is not None)
    return f"<{name}{text}>{body}</{name}>"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


@dataclass(frozen=True)
class Frame:
    """Maps data coordinates to the plot area of a W x H svg; ``log_y`` for values spanning decades."""

    x0: float
    x1: float
    y0: float
    y1: float
    log_y: bool = False

    def x(self, v: float) -> float:
        return round(LEFT + (v - self.x0) / ((self.x1 - self.x0) or 1.0) * (W - LEFT - RIGHT), 2)

    def y(self, v: float) -> float:
        lo, hi = (math.log10(self.y0), math.log10(self.y1)) if self.log_y else (self.y0, self.y1)
        at = math.log10(max(v, self.y0)) if self.log_y else v
        return round(H - BOTTOM - (at - lo) / ((hi - lo) or 1.0) * (H - TOP - BOTTOM), 2)

    def y_ticks(self) -> list[float]:
        if not self.log_y:
            return nice_ticks(self.y0, self.y1)
        decades = range(math.floor(math.log10(self.y0)), math.ceil(math.log10(self.y1)) + 1)
        return [m * 10.0**d for d in decades for m in (1, 2, 5) if self.y0 <= m * 10.0**d <= self.y1]


def value_frame(xr: tuple[float, float], values: Sequence[float], headroom: float) -> Frame:
    """Linear from 0, or logarithmic when the largest value is over 20x the median (a warm-up outlier
    would flatten everything else)."""
    top = max(values, default=1.0) or 1.0
    positive = sorted(v for v in values if v > 0)
    median = positive[len(positive) // 2] if positive else top
    if top > 20 * median:
        return Frame(xr[0], xr[1], positive[0] / 1.5, top * headroom**2, log_y=True)
    return Frame(xr[0], xr[1], 0.0, top * headroom)


def svg(plot_id: str, title: str, parts: Sequence[str]) -> str:
    return tag(
        "svg",
        "".join(parts),
        class_="plot",
        id=plot_id,
        viewBox=f"0 0 {W} {H}",
        width=W,
        height=H,
        role="img",
        aria_label=title,
        xmlns="http://www.w3.org/2000/svg",
    )


def y_axis(f: Frame, label: str, fmt: str = "{:g}") -> str:
    parts = [tag("line", x1=LEFT, y1=TOP, x2=LEFT, y2=H - BOTTOM)]
    for t in f.y_ticks():
        y = f.y(t)
        parts.append(tag("line", class_="grid", x1=LEFT, y1=y, x2=W - RIGHT, y2=y))
        parts.append(tag("text", e(fmt.format(t)), x=LEFT - 6, y=y + 4, text_anchor="end"))
    mid = (TOP + H - BOTTOM) / 2
    parts.append(
        tag("text", e(label), class_="label", transform=f"translate(14 {mid}) rotate(-90)", text_anchor="middle")
    )
    return tag("g", "".join(parts), class_="axis y-axis")


def time_axis(f: Frame) -> str:
    span_s = (f.x1 - f.x0) / 1000.0
    step_s = next((s for s in TIME_STEPS_S if span_s / s <= 6), TIME_STEPS_S[-1])
    fmt = "%H:%M:%S" if step_s < 60 else "%H:%M" if span_s < 86400 else "%m-%d %H:%M"
    parts = [tag("line", x1=LEFT, y1=H - BOTTOM, x2=W - RIGHT, y2=H - BOTTOM)]
    k = math.ceil(f.x0 / 1000.0 / step_s)
    while k * step_s * 1000.0 <= f.x1:
        ms = k * step_s * 1000.0
        x = f.x(ms)
        label = when(ms, fmt) + (f".{int(round(ms)) % 1000:03d}" if step_s < 1 else "")
        parts.append(tag("line", x1=x, y1=H - BOTTOM, x2=x, y2=H - BOTTOM + 4))
        if x + len(label) * 3.2 <= W:  # a label cut off at the right edge is left out
            parts.append(tag("text", label, x=x, y=H - BOTTOM + 16, text_anchor="middle"))
        k += 1
    parts.append(tag("text", "time (UTC)", class_="label", x=(LEFT + W - RIGHT) / 2, y=H - 6, text_anchor="middle"))
    return tag("g", "".join(parts), class_="axis x-axis")


def legend(colors: dict[str, str]) -> str:
    parts = []
    for k, (name, color) in enumerate(colors.items()):
        x, y = LEFT + 12 + (k % 3) * 240, TOP + 8 + (k // 3) * 16
        parts.append(tag("rect", x=x, y=y - 8, width=10, height=10, fill=color))
        parts.append(tag("text", e(name), x=x + 14, y=y + 1))
    return tag("g", "".join(parts), class_="legend")


def empty_plot(plot_id: str, title: str, why: str) -> str:
    return svg(plot_id, title, [tag("text", e(why), class_="empty", x=W / 2, y=H / 2, text_anchor="middle")])


def latency_plot(points: Sequence[dict[str, Any]], xr: tuple[float, float], colors: dict[str, str]) -> str:
    """Kernel ms of every successful shard execution over time, one color per series; failures as red x."""
    ok = [p for p in points if p["outcome"] == "success"]
    if not ok:
        return empty_plot("latency-over-time", "kernel latency over time", "no successful shard executions")
    f = value_frame(xr, [p["kernel_ms"] for p in ok], 1.25)  # headroom for the legend
    parts = [y_axis(f, "kernel ms" + (" (log scale)" if f.log_y else "")), time_axis(f)]
    for name, color in colors.items():
        line = " ".join(f"{f.x(p['ms'])},{f.y(p['kernel_ms'])}" for p in ok if p["series"] == name)
        if line:
            parts.append(tag("polyline", class_="series-line", points=line, stroke=color))
    for p in ok:
        title = f"{p['series']} shard {p['shard_index']}: {p['kernel_ms']:.2f} ms at {when(p['ms'])}"
        parts.append(
            tag(
                "circle",
                tag("title", e(title)),
                class_="point",
                data_series=p["series"],
                cx=f.x(p["ms"]),
                cy=f.y(p["kernel_ms"]),
                r=3,
                fill=colors[p["series"]],
            )
        )
    for p in points:
        if p["outcome"] != "success":
            x, y = f.x(p["ms"]), f.y(0)
            title = f"{p['series']} shard {p['shard_index']} failed at {when(p['ms'])}"
            d = f"M{x - 4},{y - 4}L{x + 4},{y + 4}M{x - 4},{y + 4}L{x + 4},{y - 4}"
            parts.append(tag("path", tag("title", e(title)), class_="error-point", d=d))
    parts.append(legend(colors))
    return svg("latency-over-time", "kernel latency over time", parts)


def bar_plot(plot_id: str, title: str, rows: Sequence[dict[str, Any]], colors: dict[str, str], rate: bool) -> str:
    """One bar per series: success rate, or p50 kernel ms with a p95 whisker."""
    if not rows:
        return empty_plot(plot_id, title, "no shard executions")
    f = Frame(0, len(rows), 0.0, 1.0 if rate else max(r["p95"] for r in rows) * 1.1 or 1.0)
    parts = [y_axis(f, "success rate" if rate else "kernel ms", "{:.0%}" if rate else "{:g}")]
    band = (W - LEFT - RIGHT) / len(rows)
    for k, r in enumerate(rows):
        value = r["rate"] if rate else r["p50"]
        x, width, y = round(LEFT + k * band + band * 0.2, 2), round(band * 0.6, 2), f.y(value)
        cx = round(x + width / 2, 2)
        text = f"{value:.1%} of {r['runs']}" if rate else f"p50 {r['p50']:.2f} / p95 {r['p95']:.2f} ms"
        parts.append(
            tag(
                "rect",
                tag("title", e(f"{r['series']}: {text}")),
                class_="bar",
                data_series=r["series"],
                x=x,
                y=y,
                width=width,
                height=round(H - BOTTOM - y, 2),
                fill=colors[r["series"]],
            )
        )
        label_y = y - 4 if rate else min(y, f.y(r["p95"])) - 4
        parts.append(tag("text", e(text), class_="value", x=cx, y=label_y, text_anchor="middle"))
        parts.append(tag("text", e(r["series"]), x=cx, y=H - BOTTOM + 16, text_anchor="middle"))
        if not rate:
            y95 = f.y(r["p95"])
            parts.append(tag("line", class_="p95", x1=cx - width / 4, y1=y95, x2=cx + width / 4, y2=y95))
            parts.append(tag("line", class_="p95", x1=cx, y1=y, x2=cx, y2=y95))
    return svg(plot_id, title, parts)


def recovery_plot(
    requests: Sequence[dict[str, Any]], recoveries: Sequence[dict[str, Any]], xr: tuple[float, float]
) -> str:
    """Requests (end-to-end latency, green ok / red failed) with recovery events as markers on the timeline."""
    title = "requests and recovery events"
    if not requests and not recoveries:
        return empty_plot("recovery-timeline", title, "no requests recorded")
    f = value_frame(xr, [r["latency_ms"] for r in requests], 1.15)
    parts = [y_axis(f, "request latency ms" + (" (log scale)" if f.log_y else "")), time_axis(f)]
    for r in requests:
        ok = r["outcome"] == "success"
        text = f"request {r['request_id'][:12]} {r['outcome']}: {r['latency_ms']:.1f} ms, {r['attempts']} attempt(s)"
        parts.append(
            tag(
                "circle",
                tag("title", e(text)),
                class_=f"request {'ok' if ok else 'error'}",
                cx=f.x(r["ms"]),
                cy=f.y(r["latency_ms"]),
                r=3,
            )
        )
    for ev in recoveries:
        x, state = f.x(ev["ms"]), "success" if ev["success"] else "failed"
        text = (
            f"{ev['failure']} on {ev['browser']}/{ev['platform']} shard {ev['shard_index']} -> {ev['action']} "
            f"({state}, {ev['duration_ms']:.0f} ms) at {when(ev['ms'])}"
        )
        body = (
            tag("line", x1=x, y1=TOP, x2=x, y2=H - BOTTOM)
            + tag("path", d=f"M{x - 6},{TOP}L{x + 6},{TOP}L{x},{TOP + 10}Z")
            + tag("title", e(text))
        )
        parts.append(
            tag("g", body, class_=f"marker recovery {state}", data_failure=ev["failure"], data_action=ev["action"])
        )
    if not recoveries:
        parts.append(tag("text", "no recovery events", class_="empty", x=W / 2, y=TOP + 12, text_anchor="middle"))
    return svg("recovery-timeline", title, parts)


# -- HTML -----------------------------------------------------------------------------------------

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
        table(
            ("shard type", "browser", "platform", "runs", "success", "p50 ms", "p95 ms", "avg ms", "errors"),
            [
                (
                    b["shard_type"],
                    b["browser"],
                    b["platform"],
                    b["execution_count"],
                    _pct(b["success_rate"]),
                    round(b["p50_kernel_ms"], 2),
                    round(b["p95_kernel_ms"], 2),
                    round(b["avg_kernel_ms"], 2),
                    b["error_count"],
                )
                for b in m.browsers
            ],
        ),
        table(
            ("shard", "browser", "platform", "runs", "success", "p50 ms", "p95 ms"),
            [
                (
                    s.shard_index,
                    s.browser,
                    s.platform,
                    s.runs,
                    _pct(s.success_rate),
                    round(s.p50_kernel_ms, 2),
                    round(s.p95_kernel_ms, 2),
                )
                for s in m.shards
            ],
        ),
        "<h3>Recovery events</h3>",
        table(
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
        ),
        "<h3>Recent requests</h3>",
        table(
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
        ),
    ]
    rec = recommend(m.stats, {}, "")
    if rec:
        items = [f"<li><b>{e(k)}</b>: {e(v['reason'])}</li>" for k, v in rec["browser_allocation"].items()]
        items += [f"<li>{e(s['issue'])}: {e(s['suggestion'])}</li>" for s in rec["optimization_suggestions"]]
        parts.append(f"<h3>Recommendations from these measurements</h3><ul>{''.join(items)}</ul>")
    return "".join(parts)


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
    bars: dict[str, dict[str, Any]] = {}
    for m in models:
        for s in m.stats:
            key = series(m, s.browser, s.platform)
            b = bars.setdefault(key, {"series": key, "runs": 0, "ok": 0, "p50w": 0.0, "p95w": 0.0})
            b["runs"] += s.runs
            b["ok"] += s.successes
            b["p50w"] += s.p50_kernel_ms * s.successes
            b["p95w"] += s.p95_kernel_ms * s.successes
    rows = [
        {
            **b,
            "rate": b["ok"] / b["runs"] if b["runs"] else 0.0,
            "p50": b["p50w"] / b["ok"] if b["ok"] else 0.0,
            "p95": b["p95w"] / b["ok"] if b["ok"] else 0.0,
        }
        for _, b in sorted(bars.items())
    ]
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
