"""What a failure is, and what its kind allows. Pure.

The kinds themselves are ``broker.kinds.FailureKind`` (the worker reports them). The rules here say, per kind:

============  ====================  =================  ==============
kind          counts against the    may restart the    poison when it
              worker's breaker      failed browser     follows the input
============  ====================  =================  ==============
kernel        yes                   yes                yes
browser-lost  yes                   yes                yes
worker-lost   yes                   no (it is gone)    no
timeout       yes                   yes                no
input         no                    no                 no (never retried)
unavailable   no                    no                 no
out-of-memory no                    no                 no (only a larger page helps)
============  ====================  =================  ==============

An out-of-memory failure says the page is too small for the shard, not that it is broken: it never counts
against the worker, is never retried or restarted in place, and only moves to a page with a larger budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.kinds import FAILURE_KINDS, FailureKind

from .errors import UnknownSetting

_AGAINST_WORKER = frozenset(
    {FailureKind.KERNEL, FailureKind.BROWSER_LOST, FailureKind.WORKER_LOST, FailureKind.TIMEOUT}
)
_RESTARTABLE = frozenset({FailureKind.KERNEL, FailureKind.TIMEOUT, FailureKind.BROWSER_LOST})
# The kinds a poison input produces: the page throws, or the browser dies under it.
POISON_KINDS = frozenset({FailureKind.KERNEL, FailureKind.BROWSER_LOST})


def counts_against_worker(kind: str) -> bool:
    """Whether a failure of this kind should be recorded against the worker's circuit breaker."""
    return kind in _AGAINST_WORKER


def may_restart(kind: str) -> bool:
    """Whether restarting the failed worker's browser can help after a failure of this kind: the page threw,
    hung or lost its browser. A lost worker has no browser to restart; a bad input or an unavailable stage
    is not cured by one."""
    return kind in _RESTARTABLE


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed try of one stage of one request. ``kind`` may be given as its wire string."""

    request_id: str
    stage_index: int
    worker_id: str | None
    browser: str | None
    platform: str | None
    kind: FailureKind
    error: str
    attempt: int = 1  # tries of this stage so far, this one included
    attempt_limit: int | None = None  # the request's own limit on tries per stage (max_retries + 1); None: none

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", FailureKind(self.kind))
        except ValueError:
            raise UnknownSetting(
                f"unknown failure kind {self.kind!r}; choose from {', '.join(FAILURE_KINDS)}"
            ) from None
        if self.attempt < 1:
            raise UnknownSetting(f"attempt is 1-based, got {self.attempt}")
        if self.attempt_limit is not None and self.attempt_limit < 1:
            raise UnknownSetting(f"attempt_limit counts the first try and must be >= 1, got {self.attempt_limit}")


__all__ = ["FAILURE_KINDS", "POISON_KINDS", "Failure", "FailureKind", "counts_against_worker", "may_restart"]
