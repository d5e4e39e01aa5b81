"""What the recovery policy sees besides the failure, and what it answers. Pure, immutable.

- ``Options``: what exists right now for the failed stage (gathered by the caller, breakers applied).
- ``StageHistory``: what has been tried for one stage of one request.
- The decisions, one per rung: ``Retry``, ``Restart``, ``Reroute``, ``ChangePlatform``, ``Redistribute``,
  ``DeadLetter`` (``Decision`` is their union).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UnknownSetting
from .failures import Failure
from .ladder import Rung


@dataclass(frozen=True, slots=True)
class Retry:
    delay_s: float
    worker_id: str | None = None  # None: back into the stage's pool

    @property
    def rung(self) -> Rung:
        return Rung.RETRY


@dataclass(frozen=True, slots=True)
class Restart:
    worker_id: str
    delay_s: float = 0.0

    @property
    def rung(self) -> Rung:
        return Rung.RESTART


@dataclass(frozen=True, slots=True)
class Reroute:
    worker_id: str

    @property
    def rung(self) -> Rung:
        return Rung.REROUTE


@dataclass(frozen=True, slots=True)
class ChangePlatform:
    worker_id: str
    platform: str

    @property
    def rung(self) -> Rung:
        return Rung.CHANGE_PLATFORM


@dataclass(frozen=True, slots=True)
class Redistribute:
    worker_id: str

    @property
    def rung(self) -> Rung:
        return Rung.REDISTRIBUTE


DeadLetterCause = Literal["input", "disabled", "budget", "poison", "exhausted", "memory"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    cause: DeadLetterCause = "exhausted"

    @property
    def rung(self) -> Rung:
        return Rung.DEAD_LETTER


Decision = Retry | Restart | Reroute | ChangePlatform | Redistribute | DeadLetter


def add_new(items: tuple[str, ...], *new: str | None) -> tuple[str, ...]:
    """``items`` followed by each of ``new`` that is set and not in it yet, in order."""
    out = list(items)
    for item in new:
        if item and item not in out:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class StageHistory:
    """What has been tried for one stage of one request. Immutable: each ``with_attempt`` returns a new one."""

    tried: tuple[tuple[Rung, str], ...] = ()  # (rung, worker id); "" when the stage's pool chose the worker
    workers_tried: tuple[str, ...] = ()
    platforms_tried: tuple[str, ...] = ()
    failures: tuple[tuple[str, str, str], ...] = ()  # (kind, worker id, platform) of each failure seen

    def count(self, rung: Rung) -> int:
        return sum(1 for r, _ in self.tried if r is rung)

    def with_attempt(
        self, rung: Rung, worker_id: str | None, platform: str | None, *, failure: Failure | None = None
    ) -> StageHistory:
        """Record that ``rung`` is being tried on ``worker_id`` (None: the pool) with ``platform``.

        Pass the ``failure`` that led to it so that its worker and provider count as tried and poison inputs
        can be recognised.
        """
        failures = self.failures
        workers, platforms = self.workers_tried, self.platforms_tried
        if failure is not None:
            failures += ((failure.kind, failure.worker_id or "", failure.platform or ""),)
            workers, platforms = add_new(workers, failure.worker_id), add_new(platforms, failure.platform)
        return StageHistory(
            tried=self.tried + ((rung, worker_id or ""),),
            workers_tried=add_new(workers, worker_id),
            platforms_tried=add_new(platforms, platform),
            failures=failures,
        )

    def record(self, failure: Failure, decision: Decision) -> StageHistory:
        """``with_attempt`` for a decision just taken after ``failure``."""
        if isinstance(decision, DeadLetter):
            raise UnknownSetting("a dead letter ends the stage; there is no attempt to record")
        if isinstance(decision, ChangePlatform):
            platform: str | None = decision.platform
        elif isinstance(decision, Restart) or (isinstance(decision, Retry) and decision.worker_id):
            platform = failure.platform
        else:
            platform = None  # the worker that takes it decides; its failure, if any, will say
        return self.with_attempt(decision.rung, decision.worker_id, platform, failure=failure)


@dataclass(frozen=True, slots=True)
class Options:
    """What exists right now for the failed stage, gathered by the caller (breakers already applied)."""

    replicas: tuple[str, ...] = ()  # live workers serving this shard, other than the failed one, in preference order
    spare_workers: tuple[str, ...] = ()  # healthy workers not holding the shard, in preference order
    alternative_platforms: tuple[tuple[str, str], ...] = ()  # (worker id, provider) this shard could run on
    restartable: bool = False  # the failed worker is alive and can restart its browser (kinds: may_restart)
    page_budgets_bytes: tuple[tuple[str, int], ...] = ()  # (worker id, page budget) where known (registration)

    def page_budget_bytes(self, worker_id: str | None) -> int:
        """The page budget a worker registered; 0 when unknown."""
        return next((b for w, b in self.page_budgets_bytes if w == worker_id), 0)
