"""The recovery ladder: which rungs a ``(fault_tolerance_level, recovery_strategy)`` pair climbs, in what order.

The rungs, cheapest first as the guide lists them:

- RETRY: the same stage again after exponential backoff with jitter, back into the stage's pool
  (``reconnect`` pins it to the same worker instead).
- RESTART: restart the failed worker's browser, reload its shard, and retry on it.
- REROUTE: another live worker that already serves the same shard.
- CHANGE_PLATFORM: the same shard on another execution provider (webnn -> webgpu -> wasm; wasm is the floor).
- REDISTRIBUTE: load the shard onto a healthy worker that does not hold it.
- DEAD_LETTER: give up, with the reason; always last.

**The level decides how far recovery may reach**, by what it costs:

- ``none``: nothing; the first failure goes to the dead letter.
- ``low``: only what needs no shard reloaded: RETRY and REROUTE.
- ``medium``: also reload the same shard on the same provider: RESTART and REDISTRIBUTE. This is the default,
  and it already survives losing every worker of a stage.
- ``high``: also reload it on another provider: CHANGE_PLATFORM (slower provider, slightly different numerics).
- ``critical``: every rung for every strategy (rungs a strategy leaves out are appended as a last resort),
  and twice the attempts per rung and in total.

**The strategy decides the order** (and so which rung is tried first):

- ``restart``: fix it in place first: RESTART, then RETRY, REROUTE, CHANGE_PLATFORM, REDISTRIBUTE.
- ``reconnect``: assume transient bridge or broker trouble: RETRY on the *same* worker, then RESTART, REROUTE,
  CHANGE_PLATFORM, REDISTRIBUTE.
- ``failover``: move away at once, never in place: REROUTE, REDISTRIBUTE, CHANGE_PLATFORM.
- ``progressive``: the guide's order: RETRY, RESTART, REROUTE, CHANGE_PLATFORM, REDISTRIBUTE.
- ``parallel``: progressive's ladder, and every job also runs on a second worker serving the same shard when
  one exists; the first result wins (``runs_in_parallel``).

Within a ladder, a rung with nothing to act on (no replica, no spare worker, no other provider, a lost worker
that cannot restart) is skipped, as is one whose attempts are spent; see ``policy.Policy.decide``.

The table (``describe_table()`` renders it for the README; a test keeps this copy in step):

| level | attempts per rung / in total | restart | reconnect | failover | progressive | parallel |
|---|---|---|---|---|---|---|
| none | 0 / 1 | dead letter | dead letter | dead letter | dead letter | dead letter |
| low | 2 / 6 | retry → reroute → dead letter | retry (same worker) → reroute → dead letter | reroute → dead letter | retry → reroute → dead letter | retry → reroute → dead letter; 2 workers per job |
| medium | 2 / 6 | restart → retry → reroute → redistribute → dead letter | retry (same worker) → restart → reroute → redistribute → dead letter | reroute → redistribute → dead letter | retry → restart → reroute → redistribute → dead letter | retry → restart → reroute → redistribute → dead letter; 2 workers per job |
| high | 2 / 6 | restart → retry → reroute → change platform → redistribute → dead letter | retry (same worker) → restart → reroute → change platform → redistribute → dead letter | reroute → redistribute → change platform → dead letter | retry → restart → reroute → change platform → redistribute → dead letter | retry → restart → reroute → change platform → redistribute → dead letter; 2 workers per job |
| critical | 4 / 12 | restart → retry → reroute → change platform → redistribute → dead letter | retry (same worker) → restart → reroute → change platform → redistribute → dead letter | reroute → redistribute → change platform → retry → restart → dead letter | retry → restart → reroute → change platform → redistribute → dead letter | retry → restart → reroute → change platform → redistribute → dead letter; 2 workers per job |
"""  # noqa: E501

from __future__ import annotations

import enum
from typing import Literal

from .errors import UnknownSetting


class Rung(enum.Enum):
    RETRY = "retry"
    RESTART = "restart"
    REROUTE = "reroute"
    CHANGE_PLATFORM = "change platform"
    REDISTRIBUTE = "redistribute"
    DEAD_LETTER = "dead letter"


Level = Literal["none", "low", "medium", "high", "critical"]
Strategy = Literal["restart", "reconnect", "failover", "progressive", "parallel"]

FAULT_TOLERANCE_LEVELS: tuple[Level, ...] = ("none", "low", "medium", "high", "critical")
RECOVERY_STRATEGIES: tuple[Strategy, ...] = ("restart", "reconnect", "failover", "progressive", "parallel")

DEFAULT_ATTEMPTS_PER_RUNG = 2
DEFAULT_TOTAL_ATTEMPTS = 6  # counting the first try
CRITICAL_ATTEMPT_FACTOR = 2

# What each level may reach (a set; the strategy supplies the order).
_REACH: dict[str, frozenset[Rung]] = {
    "none": frozenset(),
    "low": frozenset({Rung.RETRY, Rung.REROUTE}),
    "medium": frozenset({Rung.RETRY, Rung.REROUTE, Rung.RESTART, Rung.REDISTRIBUTE}),
    "high": frozenset({Rung.RETRY, Rung.REROUTE, Rung.RESTART, Rung.REDISTRIBUTE, Rung.CHANGE_PLATFORM}),
    "critical": frozenset({Rung.RETRY, Rung.REROUTE, Rung.RESTART, Rung.REDISTRIBUTE, Rung.CHANGE_PLATFORM}),
}

_GUIDE_ORDER = (Rung.RETRY, Rung.RESTART, Rung.REROUTE, Rung.CHANGE_PLATFORM, Rung.REDISTRIBUTE)

_ORDER: dict[str, tuple[Rung, ...]] = {
    "restart": (Rung.RESTART, Rung.RETRY, Rung.REROUTE, Rung.CHANGE_PLATFORM, Rung.REDISTRIBUTE),
    "reconnect": _GUIDE_ORDER,
    "failover": (Rung.REROUTE, Rung.REDISTRIBUTE, Rung.CHANGE_PLATFORM),
    "progressive": _GUIDE_ORDER,
    "parallel": _GUIDE_ORDER,
}

# Where a shard may go when its execution provider fails it. wasm runs everywhere and has nowhere to go.
PLATFORM_FALLBACKS: dict[str, tuple[str, ...]] = {
    "webnn": ("webgpu", "wasm"),
    "webgpu": ("wasm",),
    "auto": ("wasm",),
    "wasm": (),
}


def check_level(level: str) -> Level:
    for known in FAULT_TOLERANCE_LEVELS:
        if level == known:
            return known
    raise UnknownSetting(f"unknown fault_tolerance_level {level!r}; choose from {', '.join(FAULT_TOLERANCE_LEVELS)}")


def check_strategy(strategy: str) -> Strategy:
    for known in RECOVERY_STRATEGIES:
        if strategy == known:
            return known
    raise UnknownSetting(f"unknown recovery_strategy {strategy!r}; choose from {', '.join(RECOVERY_STRATEGIES)}")


def ladder(level: str, strategy: str) -> tuple[Rung, ...]:
    """The rungs to climb for this pair, in order, always ending with DEAD_LETTER."""
    reach = _REACH[check_level(level)]
    order = _ORDER[check_strategy(strategy)]
    if level == "critical":
        order = order + tuple(r for r in _GUIDE_ORDER if r not in order)
    return tuple(r for r in order if r in reach) + (Rung.DEAD_LETTER,)


def runs_in_parallel(strategy: str, level: str = "medium") -> bool:
    """Whether every job also runs on a second worker serving the same shard (the first result wins).

    Only ``parallel`` does, and not at level ``none``, which asks for no fault tolerance at all.
    """
    return check_strategy(strategy) == "parallel" and check_level(level) != "none"


def retries_in_place(strategy: str) -> bool:
    """Whether RETRY is pinned to the worker that failed (``reconnect``) rather than the stage's pool."""
    return check_strategy(strategy) == "reconnect"


def attempt_budget(level: str, per_rung: int, total: int) -> tuple[int, int]:
    """``(attempts per rung, attempts in total)`` for a level; ``critical`` doubles both, ``none`` allows one try."""
    if check_level(level) == "none":
        return 0, 1
    factor = CRITICAL_ATTEMPT_FACTOR if level == "critical" else 1
    return per_rung * factor, total * factor


def _cell(level: str, strategy: str) -> str:
    names = [
        "retry (same worker)" if r is Rung.RETRY and retries_in_place(strategy) else r.value
        for r in ladder(level, strategy)
    ]
    text = " → ".join(names)
    if runs_in_parallel(strategy, level):
        text += "; 2 workers per job"
    return text


def describe_table(per_rung: int = DEFAULT_ATTEMPTS_PER_RUNG, total: int = DEFAULT_TOTAL_ATTEMPTS) -> str:
    """The level/strategy table as markdown, for the README (rows: levels; columns: strategies)."""
    lines = [
        "| level | attempts per rung / in total | " + " | ".join(RECOVERY_STRATEGIES) + " |",
        "|---" * (len(RECOVERY_STRATEGIES) + 2) + "|",
    ]
    for level in FAULT_TOLERANCE_LEVELS:
        rung_budget, total_budget = attempt_budget(level, per_rung, total)
        cells = [_cell(level, strategy) for strategy in RECOVERY_STRATEGIES]
        lines.append(f"| {level} | {rung_budget} / {total_budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
