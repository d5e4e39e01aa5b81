"""The recovery decision: given a failure, what was tried and what exists now, which rung to take next. Pure.

``Policy.decide(failure, history, options, rng)`` returns one of ``Retry``, ``Restart``, ``Reroute``,
``ChangePlatform``, ``Redistribute`` or ``DeadLetter``. It does no I/O and reads no clock: the caller gathers
``Options`` (live replicas and spare workers whose breakers allow, providers other workers can run the shard
on, whether the failed worker can restart its browser), carries out the decision, and records it with
``history.record(failure, decision)`` (or ``history.with_attempt(...)``) before asking again. The caller's loop:

    history = StageHistory()
    while (failure := await run_stage(...)) is not None:
        decision = policy.decide(failure, history, options_now(), rng)
        if isinstance(decision, DeadLetter):
            break
        history = history.record(failure, decision)

Rules, in order:

1. ``input`` failures (bad input, decode error) go to the dead letter at once: never a retry storm.
2. Level ``none`` dead-letters the first failure.
3. Never more than the request's own limit (``Failure.attempt_limit``, from ``max_retries``) nor the level's
   attempt budget for the stage (``Policy.budget``), counting the first try.
4. An ``out-of-memory`` failure only moves to a larger page (``memory.larger_page``), never retried or
   restarted on a page as small; with none it is dead-lettered with the reason (cause ``memory``).
5. A poison input (kernel errors or lost browsers on ``poison_after_workers`` different workers) is only offered
   a change of provider, never more of the same; with no provider left it is dead-lettered as poison.
6. Otherwise walk ``ladder(level, strategy)`` and take the first rung that still has attempts and something to
   act on. A lost worker is never retried or restarted in place; a browser is restarted only after a failure
   of a kind that a restart can cure (``failures.may_restart``); a lost browser is restarted, not retried; a
   kernel error right after a restart of the same worker is not met with another restart; reroute and
   redistribute pick workers not tried yet for this stage; a provider is never tried twice.
7. Nothing left: ``DeadLetter`` whose reason names the rungs, workers and providers tried and the last error.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.kinds import FailureKind
from broker.retry import Backoff

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
    add_new,
)
from .errors import UnknownSetting
from .failures import POISON_KINDS, Failure, may_restart
from .ladder import (
    DEFAULT_ATTEMPTS_PER_RUNG,
    DEFAULT_TOTAL_ATTEMPTS,
    PLATFORM_FALLBACKS,
    Rung,
    attempt_budget,
    check_level,
    check_strategy,
    ladder,
    retries_in_place,
    runs_in_parallel,
)
from .memory import larger_page

_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class Policy:
    level: str = "medium"
    strategy: str = "progressive"
    max_attempts_per_rung: int = DEFAULT_ATTEMPTS_PER_RUNG
    max_total_attempts: int = DEFAULT_TOTAL_ATTEMPTS  # counting the first try; critical doubles both
    poison_after_workers: int = 2
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        check_level(self.level)
        check_strategy(self.strategy)
        for name in ("max_attempts_per_rung", "max_total_attempts", "poison_after_workers"):
            if getattr(self, name) < 1:
                raise UnknownSetting(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Policy:
        """Read ``XSHARD_FAULT_TOLERANCE_LEVEL``, ``XSHARD_RECOVERY_STRATEGY``, ``XSHARD_MAX_ATTEMPTS_PER_RUNG``,
        ``XSHARD_MAX_TOTAL_ATTEMPTS`` and ``XSHARD_POISON_AFTER_WORKERS``; ``overrides`` that are not None win."""
        env = os.environ if environ is None else environ
        names = {
            "level": "FAULT_TOLERANCE_LEVEL",
            "strategy": "RECOVERY_STRATEGY",
            "max_attempts_per_rung": "MAX_ATTEMPTS_PER_RUNG",
            "max_total_attempts": "MAX_TOTAL_ATTEMPTS",
            "poison_after_workers": "POISON_AFTER_WORKERS",
        }
        values: dict[str, object] = {}
        for name, var in names.items():
            raw = env.get(f"XSHARD_{var}")
            if raw is not None:
                try:
                    values[name] = raw.strip().lower() if name in ("level", "strategy") else int(raw)
                except ValueError as e:
                    raise UnknownSetting(f"XSHARD_{var} must be an integer, got {raw!r}") from e
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def budget(self) -> tuple[int, int]:
        """``(attempts per rung, attempts in total)`` after the level's scaling."""
        return attempt_budget(self.level, self.max_attempts_per_rung, self.max_total_attempts)

    @property
    def rungs(self) -> tuple[Rung, ...]:
        return ladder(self.level, self.strategy)

    @property
    def runs_in_parallel(self) -> bool:
        return runs_in_parallel(self.strategy, self.level)

    def decide(self, failure: Failure, history: StageHistory, options: Options, rng: random.Random) -> Decision:
        early = self._before_the_ladder(failure, history, options)
        return early if early is not None else self._climb(failure, history, options, rng)

    def _before_the_ladder(self, failure: Failure, history: StageHistory, options: Options) -> Decision | None:
        """Rules 1 to 4: bad input, level none, the budgets spent, out of memory; None: climb the ladder."""
        if failure.kind is FailureKind.INPUT:
            return DeadLetter(f"bad input, never retried ({_where(failure)}): {_clip(failure.error)}", "input")
        if self.level == "none":
            return DeadLetter(self._reason("fault_tolerance_level is none", failure, history, []), "disabled")
        _, total = self.budget
        attempts = max(failure.attempt, len(history.tried) + 1)
        limit = failure.attempt_limit
        if limit is not None and failure.attempt >= limit:
            headline = f"max_retries exhausted after {failure.attempt} attempt(s)"
            return DeadLetter(self._reason(headline, failure, history, []), "budget")
        if attempts >= total:
            return DeadLetter(self._reason(f"{attempts} of {total} attempts spent", failure, history, []), "budget")
        if failure.kind is FailureKind.OUT_OF_MEMORY:
            moved = larger_page(failure, history, options)
            if isinstance(moved, str):
                return DeadLetter(self._reason(f"out of memory, {moved}", failure, history, []), "memory")
            return moved
        return None

    def _climb(self, failure: Failure, history: StageHistory, options: Options, rng: random.Random) -> Decision:
        """Rules 5 to 7: the first rung of the ladder that can act, else the dead letter with what was skipped."""
        per_rung, _ = self.budget
        poison = _poison_workers(failure, history)
        poisoned = len(poison) >= self.poison_after_workers
        skipped: list[str] = []
        for rung in self.rungs:
            if rung is Rung.DEAD_LETTER:
                break
            if poisoned and rung is not Rung.CHANGE_PLATFORM:
                continue
            if history.count(rung) >= per_rung:
                skipped.append(f"{rung.value} (attempts spent)")
                continue
            step = self._step(rung, failure, history, options, rng)
            if isinstance(step, str):
                skipped.append(f"{rung.value} ({step})")
                continue
            return step
        if poisoned:
            headline = f"poison input: {failure.kind} on {len(poison)} workers ({', '.join(poison)})"
            return DeadLetter(self._reason(headline, failure, history, skipped), "poison")
        return DeadLetter(self._reason("recovery ladder exhausted", failure, history, skipped), "exhausted")

    def _step(
        self, rung: Rung, failure: Failure, history: StageHistory, options: Options, rng: random.Random
    ) -> Decision | str:
        """The decision for ``rung``, or why it cannot be taken now."""
        tried = set(history.workers_tried) | {failure.worker_id or ""}
        lost = _lost_workers(failure, history)  # never sent work again, whatever stale options say
        if rung is Rung.RETRY:
            if failure.kind in (FailureKind.WORKER_LOST, FailureKind.BROWSER_LOST):
                return f"nothing to retry on after {failure.kind}"
            pinned = failure.worker_id if retries_in_place(self.strategy) else None
            return Retry(self.backoff.delay_s(history.count(Rung.RETRY) + 1, rng), pinned)
        if rung is Rung.RESTART:
            if not failure.worker_id or not options.restartable:
                return "failed worker cannot restart its browser"
            if not may_restart(failure.kind):
                return f"a restart does not cure {failure.kind}"
            if failure.kind is FailureKind.KERNEL and history.tried[-1:] == ((Rung.RESTART, failure.worker_id),):
                return "a freshly restarted browser threw again"
            return Restart(failure.worker_id, self.backoff.delay_s(history.count(Rung.RESTART) + 1, rng))
        if rung is Rung.REROUTE:
            fresh = [w for w in options.replicas if w not in tried and w not in lost]
            return Reroute(fresh[0]) if fresh else "no untried replica"
        if rung is Rung.REDISTRIBUTE:
            fresh = [w for w in options.spare_workers if w not in tried and w not in lost]
            return Redistribute(fresh[0]) if fresh else "no untried spare worker"
        if rung is Rung.CHANGE_PLATFORM:
            return self._change_platform(failure, history, options, tried, lost)
        raise AssertionError(f"no step for {rung}")  # pragma: no cover - DEAD_LETTER ends the walk

    @staticmethod
    def _change_platform(
        failure: Failure, history: StageHistory, options: Options, tried: set[str], lost: set[str]
    ) -> ChangePlatform | str:
        current = failure.platform or "auto"
        used = set(history.platforms_tried) | {current}
        for platform in PLATFORM_FALLBACKS.get(current, ()):
            if platform in used:
                continue
            hosts = [w for w, p in options.alternative_platforms if p == platform and w not in lost]
            # In place first (the browser is fine, its provider is not), then workers not tried yet.
            hosts.sort(key=lambda w: (w != failure.worker_id, w in tried))
            if hosts:
                return ChangePlatform(hosts[0], platform)
        if not PLATFORM_FALLBACKS.get(current):
            return f"no provider to fall back to from {current}"
        return "no worker offers an untried provider"

    def _reason(self, headline: str, failure: Failure, history: StageHistory, skipped: list[str]) -> str:
        parts = [headline, f"{self.level}/{self.strategy} ladder", f"tried: {_tried(history)}"]
        if history.workers_tried or failure.worker_id:
            parts.append("workers: " + ", ".join(add_new(history.workers_tried, failure.worker_id)))
        if history.platforms_tried or failure.platform:
            parts.append("platforms: " + ", ".join(add_new(history.platforms_tried, failure.platform)))
        if skipped:
            parts.append("not possible: " + ", ".join(skipped))
        attempts = max(failure.attempt, len(history.tried) + 1)
        parts.append(f"last error ({_where(failure)}, attempt {attempts}): {_clip(failure.error)}")
        return "; ".join(parts)


def _poison_workers(failure: Failure, history: StageHistory) -> tuple[str, ...]:
    """Workers on which this stage's input made the page throw or the browser die."""
    seen = [w for kind, w, _ in history.failures if kind in POISON_KINDS]
    if failure.kind in POISON_KINDS:
        seen.append(failure.worker_id or "")
    return add_new((), *seen)


def _lost_workers(failure: Failure, history: StageHistory) -> set[str]:
    """Workers whose loss this stage has seen (heartbeat lapsed or process gone)."""
    lost = {w for kind, w, _ in history.failures if kind == FailureKind.WORKER_LOST}
    if failure.kind is FailureKind.WORKER_LOST and failure.worker_id:
        lost.add(failure.worker_id)
    return lost


def _tried(history: StageHistory) -> str:
    if not history.tried:
        return "nothing"
    by_rung: dict[Rung, list[str]] = {}
    for rung, worker in history.tried:
        by_rung.setdefault(rung, []).append(worker or "pool")
    return ", ".join(f"{rung.value}×{len(ws)} ({', '.join(add_new((), *ws))})" for rung, ws in by_rung.items())


def _where(failure: Failure) -> str:
    where = f"{failure.kind} on {failure.worker_id or 'no worker'}"
    if failure.browser or failure.platform:
        where += f" [{failure.browser or '?'}/{failure.platform or '?'}]"
    return f"request {failure.request_id} stage {failure.stage_index}: {where}"


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"
