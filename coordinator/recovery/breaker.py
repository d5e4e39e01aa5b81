"""Circuit breakers per worker and per (browser, platform). Pure: time is passed in as ``now_s``.

::

              failure_threshold consecutive failures
    CLOSED ─────────────────────────────────────────────▶ OPEN
      ▲                                                    │ cooldown_s passed (seen lazily, on the next call)
      │ success                                            ▼
      └──────────────────────────────────────────────── HALF_OPEN ── failure ──▶ OPEN (cool-down starts over)

An open breaker refuses (``allows`` is False) and takes its key out of allocation. Once ``cooldown_s`` has
passed it reads as half-open and lets traffic through; the first outcome recorded decides: success closes it,
failure opens it again. ``allows`` and ``state`` only look; ``record_success`` and ``record_failure`` are the
only methods that move the machine, and every move goes through ``transition``, which refuses illegal ones.

Only failures that are the worker's fault should be recorded against it (see ``counts_against_worker``):
a bad input is not a sick worker.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import IllegalTransition, UnknownSetting


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


_LEGAL: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}


def transition(current: BreakerState, target: BreakerState) -> BreakerState:
    """The one place a breaker changes state; raises ``IllegalTransition`` for a move the diagram lacks."""
    if target not in _LEGAL[current]:
        raise IllegalTransition("circuit breaker", current.value, target.value)
    return target


@dataclass(slots=True)
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown_s: float = 5.0
    consecutive_failures: int = field(default=0, init=False)
    opened_at_s: float | None = field(default=None, init=False)
    _state: BreakerState = field(default=BreakerState.CLOSED, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise UnknownSetting(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0):
            raise UnknownSetting(f"cooldown_s must be a finite number >= 0, got {self.cooldown_s!r}")

    def state(self, now_s: float) -> BreakerState:
        """The state at ``now_s``; an OPEN breaker whose cool-down has passed reads as HALF_OPEN."""
        if self._state is BreakerState.OPEN and self._cooled_down(now_s):
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now_s: float) -> bool:
        return self.state(now_s) is not BreakerState.OPEN

    def record_success(self, now_s: float) -> None:
        self._catch_up(now_s)
        self.consecutive_failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)
            self.opened_at_s = None
        # A late success while still OPEN comes from work started before the breaker opened: it proves nothing.

    def record_failure(self, now_s: float) -> None:
        self._catch_up(now_s)
        self.consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._state is BreakerState.CLOSED and self.consecutive_failures >= self.failure_threshold
        ):
            self._move(BreakerState.OPEN)
            self.opened_at_s = now_s
        # A late failure while OPEN does not extend the cool-down.

    def snapshot(self, now_s: float) -> dict[str, Any]:
        return {
            "state": self.state(now_s).value,
            "consecutive_failures": self.consecutive_failures,
            "opened_at_s": self.opened_at_s,
        }

    def _cooled_down(self, now_s: float) -> bool:
        return self.opened_at_s is not None and now_s - self.opened_at_s >= self.cooldown_s

    def _catch_up(self, now_s: float) -> None:
        if self._state is BreakerState.OPEN and self._cooled_down(now_s):
            self._move(BreakerState.HALF_OPEN)

    def _move(self, target: BreakerState) -> None:
        self._state = transition(self._state, target)


def breaker_key_name(key: Hashable) -> str:
    """A JSON-friendly name for a breaker key: ``"w1"``, ``("chromium", "webgpu")`` -> ``"chromium/webgpu"``."""
    if isinstance(key, tuple):
        return "/".join(str(part) for part in key)
    return str(key)


@dataclass(slots=True)
class Breakers:
    """Circuit breakers keyed by anything hashable (worker ids, ``(browser, platform)`` tuples), made on first use."""

    failure_threshold: int = 3
    cooldown_s: float = 5.0
    _by_key: dict[Hashable, CircuitBreaker] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        CircuitBreaker(self.failure_threshold, self.cooldown_s)  # validates the settings once, up front

    def breaker(self, key: Hashable) -> CircuitBreaker:
        found = self._by_key.get(key)
        if found is None:
            found = self._by_key[key] = CircuitBreaker(self.failure_threshold, self.cooldown_s)
        return found

    def record(self, key: Hashable, ok: bool, now_s: float) -> None:
        if ok:
            self.breaker(key).record_success(now_s)
        else:
            self.breaker(key).record_failure(now_s)

    def allows(self, key: Hashable, now_s: float) -> bool:
        """True for a key never seen: no evidence against it."""
        found = self._by_key.get(key)
        return found is None or found.allows(now_s)

    def state(self, key: Hashable, now_s: float) -> BreakerState:
        found = self._by_key.get(key)
        return BreakerState.CLOSED if found is None else found.state(now_s)

    def open_keys(self, now_s: float) -> list[Hashable]:
        return [key for key, b in self._by_key.items() if not b.allows(now_s)]

    def snapshot(self, now_s: float) -> dict[str, dict[str, Any]]:
        return {breaker_key_name(key): b.snapshot(now_s) for key, b in self._by_key.items()}

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)
