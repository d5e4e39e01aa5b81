"""The one retry loop: exponential backoff with proportional jitter, bounded by a deadline or a stop flag.

``Backoff`` is pure (randomness comes from the caller's ``random.Random``). ``retrying`` runs one operation
until it succeeds, giving up when its deadline passes or its stop flag is set; there is no "retry forever":
a caller gives ``deadline_s``, ``stop`` or both. ``poll`` paces a loop that runs until shutdown::

    async for _ in poll(interval_s, stop):
        await retrying(self._tick, what="monitor tick", stop=stop)

Every reconnect, resubmit and poll loop of xshard (worker, dispatcher, monitor, request tracker, history
writer and store) goes through these two functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import BrokerUnavailable, SettingError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """``delay_s(n)`` for the n-th try (1-based) is ``min(max_s, base_s * factor ** (n - 1))`` scaled by a
    factor drawn uniformly from ``[1 - jitter, 1]``: ``jitter=0`` is none, ``jitter=1`` is "full jitter"."""

    base_s: float = 0.05
    factor: float = 2.0
    max_s: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_s) and self.base_s > 0):
            raise SettingError(f"backoff base_s must be a positive number, got {self.base_s!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise SettingError(f"backoff factor must be >= 1, got {self.factor!r}")
        if not (math.isfinite(self.max_s) and self.max_s >= self.base_s):
            raise SettingError(f"backoff max_s must be finite and >= base_s, got {self.max_s!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise SettingError(f"backoff jitter must be within [0, 1], got {self.jitter!r}")

    def cap_s(self, attempt: int) -> float:
        """The delay before jitter for the ``attempt``-th try (1-based), capped at ``max_s``."""
        if attempt < 1:
            raise SettingError(f"backoff attempt is 1-based, got {attempt}")
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


RECONNECT = Backoff()  # broker reconnects: 50 ms doubling to 2 s, half jitter
_rng = random.Random()


class Stopped(Exception):
    """``retrying`` was stopped (its stop flag was set) before the operation succeeded."""


async def sleep_unless_stopped(delay_s: float, stop: asyncio.Event | None) -> bool:
    """Sleep ``delay_s``; return True early (and at once) when ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(delay_s)
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay_s)
    return stop.is_set()


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float | None = None,
    stop: asyncio.Event | None = None,
    backoff: Backoff = RECONNECT,
    retry_on: tuple[type[BaseException], ...] = (BrokerUnavailable,),
    on_retry: Callable[[BaseException], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """``await op()`` until it succeeds; after a ``retry_on`` error wait ``backoff`` and try again.

    Gives up by re-raising the last error once ``deadline_s`` (seconds from now) has passed, or by raising
    ``Stopped`` when ``stop`` is set. ``on_retry`` sees each error before the wait (to reset a reader, say).
    """
    if deadline_s is None and stop is None:
        raise SettingError(f"retrying {what}: give a deadline_s or a stop flag; xshard never retries forever")
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    attempt = 0
    while True:
        if stop is not None and stop.is_set():
            raise Stopped(what)
        try:
            return await op()
        except retry_on as e:
            attempt += 1
            if on_retry is not None:
                on_retry(e)
            delay_s = backoff.delay_s(attempt, rng or _rng)
            if deadline is not None and time.monotonic() + delay_s > deadline:
                raise
            log.warning("%s: %s; retrying in %.2fs (attempt %d)", what, e, delay_s, attempt)
            if await sleep_unless_stopped(delay_s, stop):
                raise Stopped(what) from e


async def poll(interval_s: float, stop: asyncio.Event) -> AsyncIterator[int]:
    """Yield 0, 1, 2, ... every ``interval_s`` until ``stop`` is set (the first at once)."""
    n = 0
    while not stop.is_set():
        yield n
        n += 1
        if await sleep_unless_stopped(interval_s, stop):
            return
