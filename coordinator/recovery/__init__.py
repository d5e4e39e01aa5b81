"""Fault-tolerance policies: small, pure, and tested without Redis.

- ``Backoff`` (from ``broker.retry``, the one retry helper): exponential backoff with proportional jitter.
- ``breaker``: circuit breakers per worker and per (browser, platform) (``CircuitBreaker``, ``Breakers``).
- ``ladder``: the recovery ladder and the level/strategy table (``ladder``, ``describe_table``).
- ``policy``: the decision itself (``Policy.decide(failure, history, options, rng) -> Decision``).

Nothing here does I/O, sleeps, or reads the clock; callers pass ``now_s`` and a ``random.Random``.
"""

from broker.retry import Backoff

from .breaker import Breakers, BreakerState, CircuitBreaker, breaker_key_name, transition
from .errors import IllegalTransition, RecoveryError, UnknownSetting
from .ladder import (
    FAULT_TOLERANCE_LEVELS,
    PLATFORM_FALLBACKS,
    RECOVERY_STRATEGIES,
    Level,
    Rung,
    Strategy,
    attempt_budget,
    describe_table,
    ladder,
    retries_in_place,
    runs_in_parallel,
)
from .policy import (
    FAILURE_KINDS,
    ChangePlatform,
    DeadLetter,
    Decision,
    Failure,
    FailureKind,
    Options,
    Policy,
    Redistribute,
    Reroute,
    Restart,
    Retry,
    StageHistory,
    counts_against_worker,
)

__all__ = [
    "FAILURE_KINDS",
    "FAULT_TOLERANCE_LEVELS",
    "PLATFORM_FALLBACKS",
    "RECOVERY_STRATEGIES",
    "Backoff",
    "BreakerState",
    "Breakers",
    "ChangePlatform",
    "CircuitBreaker",
    "DeadLetter",
    "Decision",
    "Failure",
    "FailureKind",
    "IllegalTransition",
    "Level",
    "Options",
    "Policy",
    "RecoveryError",
    "Redistribute",
    "Reroute",
    "Restart",
    "Retry",
    "Rung",
    "StageHistory",
    "Strategy",
    "UnknownSetting",
    "attempt_budget",
    "breaker_key_name",
    "counts_against_worker",
    "describe_table",
    "ladder",
    "retries_in_place",
    "runs_in_parallel",
    "transition",
]
