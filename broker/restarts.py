"""A worker's own browser-restart budget: a pure rule, so the worker (which cannot import the coordinator)
and the coordinator's recovery policies (``coordinator.recovery`` re-exports it) share one rule and one set
of numbers.

A worker may restart its browser at most ``max_restarts`` times within any ``window_s`` seconds. One more
restart within the window means the browser cannot be kept alive: the worker stops instead, and the
coordinator's recovery moves its stages elsewhere. The caller keeps the times of its recent restarts and
the clock; ``decide`` only looks::

    verdict = budget.decide(recent_s, time.monotonic())
    recent_s = verdict.kept_times_s
    if not verdict.allowed:
        stop(verdict.reason)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import SettingError


@dataclass(frozen=True, slots=True)
class RestartVerdict:
    """Whether the restart asked for at ``now_s`` may go ahead, the restart times still inside the window
    (this one included) and, when refused, why."""

    allowed: bool
    kept_times_s: tuple[float, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RestartBudget:
    """At most ``max_restarts`` browser restarts within any ``window_s`` seconds."""

    max_restarts: int = 5
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise SettingError(f"restart budget max_restarts must be >= 0, got {self.max_restarts!r}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise SettingError(f"restart budget window_s must be a positive number, got {self.window_s!r}")

    def decide(self, recent_restart_times_s: Iterable[float], now_s: float) -> RestartVerdict:
        """May the browser restart at ``now_s``, given the times (same clock) of the restarts before it?"""
        kept = (*(t for t in recent_restart_times_s if now_s - t < self.window_s), now_s)
        if len(kept) <= self.max_restarts:
            return RestartVerdict(True, kept)
        reason = f"browser restarted {self.max_restarts} times in {self.window_s:g}s"
        return RestartVerdict(False, kept, reason)
