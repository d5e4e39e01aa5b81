"""Recommendations and history-driven allocation from measured browser statistics. Pure: no I/O.

Everything here is computed from ``BrowserStat`` rows that the history store measured; with no
measurements there are no recommendations (``recommend`` returns ``{}``) and the allocation is left as
it was. Where the measurements contradict the guide's static table, the data wins and the reason says so.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from coordinator.errors import AllocationError
from coordinator.planning.allocation import GUIDE_TABLE, Slot, normalize_browser

MIN_RUNS = 5
MIN_SUCCESS_RATE = 0.9
MIN_SPEEDUP = 0.1  # a shard moves only if the best is at least 10% faster than where it would run now
CUSTOM_REASON = "custom_browser_allocation"


def ms(value: float) -> str:
    """``41.2 ms``; two decimals under 10 ms, where one would make 0.48 and 0.52 look equal."""
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"


@dataclass(frozen=True, slots=True)
class BrowserStat:
    """What one browser+platform measured for one model and shard type (over all shards when
    ``shard_index`` is None). Latencies are kernel times of successful executions."""

    browser: str
    platform: str
    runs: int
    successes: int
    p50_kernel_ms: float
    p95_kernel_ms: float
    avg_kernel_ms: float
    model_name: str = ""
    shard_type: str = ""
    shard_index: int | None = None
    kind: str = ""  # over the shards of this kind ("attention", "vision", ...) only; "" for all kinds

    @property
    def errors(self) -> int:
        return self.runs - self.successes

    @property
    def success_rate(self) -> float:
        return self.successes / self.runs if self.runs else 0.0

    @property
    def label(self) -> str:
        return f"{self.browser}/{self.platform}"

    def describe(self) -> str:
        """``100.0% success over 40 runs, p50 41.2 ms kernel``."""
        return f"{self.success_rate:.1%} success over {self.runs} runs, p50 {ms(self.p50_kernel_ms)} kernel"


def combine(stats: Sequence[BrowserStat]) -> list[BrowserStat]:
    """One row per browser+platform over the given rows. Counts add up exactly; p50/p95/avg are the
    success-weighted means of the rows' values (exact when there is one row per browser+platform)."""
    groups: dict[tuple[str, str], list[BrowserStat]] = {}
    for s in stats:
        groups.setdefault((s.browser, s.platform), []).append(s)
    out = []
    for (browser, platform), rows in groups.items():
        ok = sum(r.successes for r in rows)

        def mean(attr: str, rows: list[BrowserStat] = rows, ok: int = ok) -> float:
            return sum(getattr(r, attr) * r.successes for r in rows) / ok if ok else 0.0

        out.append(
            BrowserStat(
                browser,
                platform,
                sum(r.runs for r in rows),
                ok,
                mean("p50_kernel_ms"),
                mean("p95_kernel_ms"),
                mean("avg_kernel_ms"),
                rows[0].model_name,
                rows[0].shard_type if len(rows) == 1 else "",
            )
        )
    return out


def qualified(stats: Sequence[BrowserStat], min_runs: int, min_success_rate: float) -> list[BrowserStat]:
    """Rows with enough runs and a high enough success rate, fastest (lowest p50) first."""
    good = [s for s in stats if s.runs >= min_runs and s.successes > 0 and s.success_rate >= min_success_rate]
    return sorted(good, key=lambda s: (s.p50_kernel_ms, -s.success_rate, s.label))


def compare(best: BrowserStat, others: Sequence[BrowserStat], lead: str) -> str:
    """``firefox/wasm: best measured: 100.0% success over 40 runs, p50 41.2 ms kernel vs chromium/wasm 88.0 ms``."""
    rest = [s for s in others if s.label != best.label]
    text = f"{best.label}: {lead if rest else 'only measured choice'}: {best.describe()}"
    if rest:
        text += " vs " + ", ".join(
            f"{s.label} {ms(s.p50_kernel_ms)}" + (f" ({s.success_rate:.1%} success)" if s.success_rate < 1 else "")
            for s in rest
        )
    return text


def guide_choices(model_type: str, specializations: Collection[str] = ()) -> dict[str, str]:
    """The guide table's browsers for this model type (and these roles, if given): browser -> row text."""
    out: dict[str, str] = {}
    for (mtype, role), (browser, why) in GUIDE_TABLE.items():
        wanted = role in specializations
        if (mtype == model_type and (not specializations or wanted)) or (mtype == "*" and wanted):
            out.setdefault(normalize_browser(browser), f"{mtype} {role} -> {browser} ({why})")
    return out


def follows_guide(browser: str, guide: Mapping[str, str]) -> bool:
    """Whether ``browser`` is what the guide table asks for; Chromium stands in for Edge (same engine, and
    what allocation falls back to where Edge is not installed)."""
    return browser in guide or (browser == "chromium" and "edge" in guide)


def versus_guide(best: BrowserStat, pool: Sequence[BrowserStat], guide: Mapping[str, str]) -> str:
    """``agrees``, ``overrides`` (the guide's browser was measured and lost) or ``unmeasured``."""
    if not guide or follows_guide(best.browser, guide):
        return "agrees"
    lost = any(follows_guide(s.browser, guide) and s.successes for s in pool)
    return "overrides" if lost else "unmeasured"


def _entry(pick: tuple[BrowserStat, str], pool: Sequence[BrowserStat], guide: Mapping[str, str]) -> dict[str, Any]:
    best, lead = pick
    reason = compare(best, pool, lead)
    table = "; ".join(guide.values())
    verdict = versus_guide(best, pool, guide)
    if verdict == "overrides":
        reason += f"; the measurements override the guide table ({table})"
    elif verdict == "unmeasured":
        reason += f"; the guide table's choice has no measurements here ({table})"
    return {
        "recommended_browser": best.browser,
        "recommended_platform": best.platform,
        "reason": reason,
        "success_rate": round(best.success_rate, 4),
        "p50_kernel_ms": round(best.p50_kernel_ms, 3),
        "runs": best.runs,
    }


def _pick(stats: Sequence[BrowserStat], min_runs: int, min_success_rate: float) -> tuple[BrowserStat, str] | None:
    """The fastest row that clears the bars; failing that, the most reliable measured one, said so."""
    ranked = qualified(stats, min_runs, min_success_rate)
    if ranked:
        return ranked[0], "best measured"
    measured = sorted(qualified(stats, 1, 0.0), key=lambda s: (-s.success_rate, s.p50_kernel_ms, s.label))
    if not measured:
        return None
    return measured[0], f"best measured so far (below {min_runs} runs at {min_success_rate:.0%} success)"


def recommend(
    stats: Sequence[BrowserStat],
    allocation: Mapping[int, Mapping[str, Any]],
    model_type: str,
    *,
    min_runs: int = MIN_RUNS,
    min_success_rate: float = MIN_SUCCESS_RATE,
) -> dict[str, Any]:
    """The guide's recommendations shape, from measurements only; ``{}`` when nothing was measured.

    ``stats``: rows per (shard type, browser, platform) over all shards (``shard_index`` None), and per
    (kind, browser, platform) for shards that hold a kind (``kind`` set): each kind gets its own entry,
    ``browser_allocation["attention"]``, ``["vision"]``..., judged against the guide table's row for it.
    ``allocation``: shard index -> ``{"browser", "platform", "specialization"?}`` in use now (may be empty).
    """
    by_kind = [s for s in stats if s.shard_index is None and s.runs > 0 and s.kind]
    stats = [s for s in stats if s.shard_index is None and s.runs > 0 and not s.kind]
    overall_pool = combine(stats)
    pick = _pick(overall_pool, min_runs, min_success_rate)
    if pick is None:
        return {}
    best = pick[0]
    roles = {str(a["specialization"]) for a in allocation.values() if a.get("specialization")}
    guide = guide_choices(model_type, roles) or guide_choices(model_type)
    browser_allocation: dict[str, Any] = {"overall": _entry(pick, overall_pool, guide)}
    for shard_type in sorted({s.shard_type for s in stats if s.shard_type}):
        pool = [s for s in stats if s.shard_type == shard_type]
        top = _pick(pool, min_runs, min_success_rate)
        if top is not None:
            browser_allocation[shard_type] = _entry(top, pool, guide)
    for kind in sorted({s.kind for s in by_kind} - set(browser_allocation)):
        pool = combine([s for s in by_kind if s.kind == kind])
        top = _pick(pool, min_runs, min_success_rate)
        if top is not None:
            browser_allocation[kind] = _entry(top, pool, guide_choices(model_type, {kind}) or guide)
    return {
        "browser_allocation": browser_allocation,
        "optimization_suggestions": suggestions(best, overall_pool, allocation, guide, min_runs, min_success_rate),
    }


def suggestions(
    best: BrowserStat,
    pool: Sequence[BrowserStat],
    allocation: Mapping[int, Mapping[str, Any]],
    guide: Mapping[str, str],
    min_runs: int,
    min_success_rate: float,
) -> list[dict[str, str]]:
    out = []
    if allocation:
        on_best = sum(
            1 for a in allocation.values() if (a.get("browser"), a.get("platform")) == (best.browser, best.platform)
        )
        if on_best < len(allocation):
            slower = [s for s in qualified(pool, 1, 0.0) if s.label != best.label]
            vs = f" vs {slower[0].label} {ms(slower[0].p50_kernel_ms)}" if slower else ""
            out.append(
                {
                    "type": "allocation",
                    "issue": f"Only {on_best}/{len(allocation)} shards using the best measured browser ({best.label})",
                    "suggestion": f"Consider reallocating more shards to {best.label}: measured p50 "
                    f"{ms(best.p50_kernel_ms)} kernel{vs}",
                }
            )
    for s in sorted(pool, key=lambda s: s.label):
        if s.runs >= min_runs and s.success_rate < min_success_rate:
            out.append(
                {
                    "type": "reliability",
                    "issue": f"{s.label} failed {s.errors} of {s.runs} runs ({s.success_rate:.1%} success)",
                    "suggestion": f"Avoid {s.label} for this model until its errors are understood "
                    "(see the recovery events in xshard history)",
                }
            )
        elif s.runs < min_runs:
            out.append(
                {
                    "type": "measurement",
                    "issue": f"{s.label} has only {s.runs} measured runs (fewer than {min_runs})",
                    "suggestion": f"Run more requests on {s.label} before trusting its numbers",
                }
            )
    if versus_guide(best, pool, guide) == "overrides":
        out.append(
            {
                "type": "guide_table",
                "issue": f"The guide table recommends {', '.join(sorted(guide))} for this model type, but {best.label} "
                f"measured best ({best.describe()})",
                "suggestion": f"History-driven allocation uses {best.label}; keep a db_path so it stays measured",
            }
        )
    return out


def _candidates(
    stats: Sequence[BrowserStat], shard_index: int, min_runs: int, min_success_rate: float
) -> tuple[list[BrowserStat], list[BrowserStat], str]:
    """Same-shard measurements when at least two browser+platforms ran this shard; otherwise all shards."""
    same = [s for s in stats if s.shard_index == shard_index]
    ranked = qualified(same, min_runs, min_success_rate)
    if len(ranked) >= 2:
        return ranked, same, f"on shard {shard_index}"
    pool = combine([s for s in stats if s.shard_index is None and not s.kind])
    return qualified(pool, min_runs, min_success_rate), pool, "over all shards"


def allocate_from_history(
    slots: Mapping[int, Slot],
    stats: Sequence[BrowserStat],
    *,
    min_runs: int = MIN_RUNS,
    min_success_rate: float = MIN_SUCCESS_RATE,
    platform: str = "auto",
    fixed: Collection[int] = (),
    installed: Callable[[str], bool] = lambda browser: True,
    min_speedup: float = MIN_SPEEDUP,
) -> dict[int, Slot]:
    """Move each shard not fixed by the user to the browser+platform that measured best for this model
    and shard type: lowest p50 kernel latency among those with at least ``min_runs`` runs and a success
    rate of at least ``min_success_rate``. Shards without such measurements keep their slot.

    ``stats``: rows for this model and shard type, over all shards (``shard_index`` None) and, where
    known, per shard index of this plan. A shard named in ``fixed``, or whose slot came from
    ``custom_browser_allocation``, is left alone. ``platform`` other than ``auto`` limits the candidates
    to that platform; browsers for which ``installed`` is false are skipped. A shard whose current
    browser also qualifies stays there unless the best is at least ``min_speedup`` (a fraction) faster.
    """
    if not 0.0 <= min_success_rate <= 1.0 or min_runs < 1 or not 0.0 <= min_speedup < 1.0:
        raise AllocationError(
            f"need min_runs >= 1, min_success_rate in [0, 1], min_speedup in [0, 1); got "
            f"{min_runs}, {min_success_rate}, {min_speedup}"
        )
    usable = [s for s in stats if installed(s.browser) and (platform == "auto" or s.platform == platform)]
    out = dict(slots)
    for i, slot in slots.items():
        if i in fixed or slot.reason == CUSTOM_REASON:
            continue
        ranked, pool, basis = _candidates(usable, i, min_runs, min_success_rate)
        if not ranked:
            continue
        best = ranked[0]
        current = next((s for s in ranked if s.browser == slot.browser and slot.platform in ("auto", s.platform)), None)
        if current is not None and current.p50_kernel_ms <= best.p50_kernel_ms / (1.0 - min_speedup):
            best, lead = current, f"within {min_speedup:.0%} of the fastest, kept"
        else:
            lead = "measured fastest"
        reason = f"history {basis}: " + compare(best, [s for s in pool if s.successes], lead)
        if best.browser != slot.browser:
            measured = any(s.browser == slot.browser and s.successes for s in pool)
            verb = "the data overrides" if measured else "replaces, as it has no measurements here,"
            reason += f"; {verb} the earlier choice ({slot.reason})"
        out[i] = replace(slot, browser=best.browser, platform=best.platform, reason=reason)
    return out


__all__ = ["BrowserStat", "allocate_from_history", "combine", "recommend"]
