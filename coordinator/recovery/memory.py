"""Where a stage goes after its page ran out of memory. Pure.

An out-of-memory failure says the page is too small for the shard: a retry, a restart or another provider
on a page of the same size meets the same wall. The stage may only move to a live worker, not tried yet
for it, whose registered page budget (``Options.page_budgets_bytes``) is larger than that of every page on
which it ran out of memory: a replica first (``Reroute``, it holds the shard already), else a spare worker
(``Redistribute``). A page whose budget is unknown is never taken for a larger one.
"""

from __future__ import annotations

from broker.kinds import FailureKind
from coordinator.planning.sizing import gb

from .decisions import Options, Redistribute, Reroute, StageHistory
from .failures import Failure


def exhausted_budget_bytes(failure: Failure, history: StageHistory, options: Options) -> int:
    """The largest page budget on which this stage has run out of memory (0 when none is known)."""
    workers = [w for kind, w, _ in history.failures if kind == FailureKind.OUT_OF_MEMORY]
    if failure.kind is FailureKind.OUT_OF_MEMORY:
        workers.append(failure.worker_id or "")
    return max((options.page_budget_bytes(w) for w in workers), default=0)


def larger_page(failure: Failure, history: StageHistory, options: Options) -> Reroute | Redistribute | str:
    """The decision that moves the stage to a larger page, or why there is none."""
    floor = exhausted_budget_bytes(failure, history, options)
    tried = set(history.workers_tried) | {failure.worker_id or ""}
    lost = {w for kind, w, _ in history.failures if kind == FailureKind.WORKER_LOST}

    def bigger(workers: tuple[str, ...]) -> list[str]:
        fresh = [w for w in workers if w not in tried and w not in lost and options.page_budget_bytes(w) > floor]
        return sorted(fresh, key=lambda w: -options.page_budget_bytes(w))

    if replicas := bigger(options.replicas):
        return Reroute(replicas[0])
    if spares := bigger(options.spare_workers):
        return Redistribute(spares[0])
    return f"no untried page holds more than {gb(floor)}" if floor else "no untried page with a known larger budget"
