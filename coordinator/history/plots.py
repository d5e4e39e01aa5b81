"""The report's plots, drawn as inline SVG: no scripts, no external resources.

Plots and their marks have stable ids and classes (``svg.plot#latency-over-time circle.point``,
``#success-rate rect.bar``, ``#latency-by-browser rect.bar``, ``#recovery-timeline circle.request`` and
``g.marker``) so that a test can find them in a real browser.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.history.report_data import when

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
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
