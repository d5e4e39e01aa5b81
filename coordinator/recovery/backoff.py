"""Exponential backoff with proportional jitter. Pure: randomness comes from the caller's ``random.Random``.

``delay_s(n)`` for the n-th try (1-based) is ``min(max_s, base_s * factor ** (n - 1))`` scaled by a factor
drawn uniformly from ``[1 - jitter, 1]``: ``jitter=0`` is no jitter, ``jitter=1`` is "full jitter"
(anywhere between 0 and the capped delay). Attempt 1 waits about ``base_s``; no delay exceeds ``max_s``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import UnknownSetting


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float = 0.05
    factor: float = 2.0
    max_s: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_s) and self.base_s > 0):
            raise UnknownSetting(f"backoff base_s must be a positive number, got {self.base_s!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise UnknownSetting(f"backoff factor must be >= 1, got {self.factor!r}")
        if not (math.isfinite(self.max_s) and self.max_s >= self.base_s):
            raise UnknownSetting(f"backoff max_s must be finite and >= base_s, got {self.max_s!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise UnknownSetting(f"backoff jitter must be within [0, 1], got {self.jitter!r}")

    def cap_s(self, attempt: int) -> float:
        """The delay before jitter for the ``attempt``-th try (1-based), capped at ``max_s``."""
        if attempt < 1:
            raise UnknownSetting(f"backoff attempt is 1-based, got {attempt}")
        exponent = attempt - 1
        if self.factor == 1.0:
            return self.base_s
        # Past this exponent the cap applies; checking first keeps factor ** exponent from overflowing.
        if exponent >= math.log(self.max_s / self.base_s, self.factor) + 1:
            return self.max_s
        return min(self.max_s, self.base_s * self.factor**exponent)

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the ``attempt``-th try (1-based). Deterministic for a seeded ``rng``."""
        return self.cap_s(attempt) * (1.0 - self.jitter * rng.random())
