"""Fault-tolerance policies: small, pure, and tested without Redis.

- ``Backoff`` (from ``broker.retry``, the one retry helper): exponential backoff with proportional jitter.
- ``breaker``: circuit breakers per worker and per (browser, platform) (``CircuitBreaker``, ``Breakers``).
- ``ladder``: the recovery ladder and the level/strategy table (``ladder``, ``describe_table``).
- ``failures``: what a failure is and what its kind allows (``Failure``, ``may_restart``, ``counts_against_worker``).
- ``decisions``: what the policy sees besides the failure and what it answers (``Options``, ``StageHistory``,
  ``Retry`` ... ``DeadLetter``).
- ``memory``: where a stage goes after its page ran out of memory (``larger_page``: a larger page, never one
  as small).
- ``policy``: the decision itself (``Policy.decide(failure, history, options, rng) -> Decision``).
- ``RestartBudget`` (from ``broker.restarts``, so the worker applies it too): how many browser restarts a
  worker may make within a window before it stops (``decide(recent_restart_times_s, now_s) -> RestartVerdict``).
- ``orphan``: a stage left without a live worker (``decide_orphan(...) -> OrphanPlan | None``).

Nothing here does I/O, sleeps, or reads the clock; callers pass ``now_s`` and a ``random.Random``.
"""

from broker.restarts import RestartBudget, RestartVerdict
from broker.retry import Backoff

from .breaker import Breakers, BreakerState, CircuitBreaker, breaker_key_name, transition
from .decisions import (
    ChangePlatform,
    DeadLetter,
    Decision,
    Options,
    Redistribute,
    Reroute,
    Restart,
    Retry,
    StageHistory,
)
from .errors import IllegalTransition, RecoveryError, UnknownSetting
from .failures import FAILURE_KINDS, Failure, FailureKind, counts_against_worker, may_restart
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
from .orphan import OrphanPlan, decide_orphan
from .policy import Policy

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
    "OrphanPlan",
    "Options",
    "Policy",
    "RecoveryError",
    "Redistribute",
    "Reroute",
    "Restart",
    "RestartBudget",
    "RestartVerdict",
    "Retry",
    "Rung",
    "StageHistory",
    "Strategy",
    "UnknownSetting",
    "attempt_budget",
    "breaker_key_name",
    "counts_against_worker",
    "decide_orphan",
    "describe_table",
    "ladder",
    "may_restart",
    "retries_in_place",
    "runs_in_parallel",
    "transition",
]
