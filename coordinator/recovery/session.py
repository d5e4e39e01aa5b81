"""What to do when a generation session's step fails at a stage. Pure: ``decide_session(fault, policy)``.

A session keeps state in its holders' pages (each stage's KV cache), so its recovery differs from a request's
(``policy.Policy.decide``): a request's stage is simply run again somewhere, a session's stage needs its cache
back first. The answers, cheapest first:

- ``Restore``: another worker takes the stage over and rebuilds the stage's cache from its copy in Redis
  (written with every hand-off, ``broker.sessions``), then the step goes on from that stage: nothing is
  replayed. Possible where the copy is at the step before this one.
- ``Replay``: a fresh step over the session's whole token history rebuilds every stage's cache, on the
  holders as they are (the holder is alive: its page lost the cache and its worker had no copy to restore).
- ``Reroute``: another worker takes the stage over, then the history is replayed (no usable copy).
- ``Fail``: the generation ends with the reason (bad input, a refused session, a kernel error that would meet
  a replay again, the level's budget spent, nowhere to go).

A page whose worker restores the cache from its own copy before replying (``shard_worker.mirror``) is not a
failure the coordinator sees. The ladder of ``(fault_tolerance_level, recovery_strategy)`` (``ladder``) decides
what may be done, as for requests: a replay in place needs an in-place rung (retry or restart), a new holder
that already serves the stage needs ``reroute``, one that must load it first ``redistribute``; ``none`` does
nothing; the level's attempt budget (``policy.Policy.budget``) bounds the recoveries of one session.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.kinds import FailureKind

from .ladder import Rung
from .policy import Policy

#: Kinds a replay or a new holder can cure; others end the generation.
CURABLE = frozenset(
    {
        FailureKind.BROWSER_LOST,
        FailureKind.TIMEOUT,
        FailureKind.UNAVAILABLE,
        FailureKind.WORKER_LOST,
        FailureKind.OUT_OF_MEMORY,
    }
)


@dataclass(frozen=True, slots=True)
class SessionFault:
    """A failed step as the driver sees it, and what it could act on."""

    stage: int
    kind: FailureKind
    error: str
    holder_alive: bool  # the stage's holder still heartbeats
    refused: bool = False  # the page refused the session (its limit): never tried again
    mirrored: bool = False  # Redis holds the stage's cache as of the step before this one
    replica: bool = False  # another live worker already serves the stage
    spare: bool = False  # a live worker that does not serve the stage could be given it
    recoveries: int = 0  # recoveries this session already made


@dataclass(frozen=True, slots=True)
class Restore:
    stage: int
    redistribute: bool  # the new holder must load the stage's shard first
    reason: str


@dataclass(frozen=True, slots=True)
class Replay:
    reason: str


@dataclass(frozen=True, slots=True)
class Reroute:
    stage: int
    redistribute: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str


SessionDecision = Restore | Replay | Reroute | Fail


def decide_session(fault: SessionFault, policy: Policy) -> SessionDecision:
    """The answer to ``fault`` under ``policy`` (module docstring)."""
    where = f"stage {fault.stage} ({fault.kind.value}: {fault.error})"
    if fault.refused or fault.kind is FailureKind.INPUT:
        return Fail(f"{where}: refused, never tried again")
    if policy.level == "none":
        return Fail(f"{where}: fault_tolerance_level is none")
    if fault.kind not in CURABLE:
        return Fail(f"{where}: a replay would meet it again")
    _, total = policy.budget
    if fault.recoveries + 1 >= total:
        return Fail(f"{where}: {fault.recoveries} recoveries, the most level {policy.level} allows is {total - 1}")
    rungs = set(policy.rungs)
    in_place = bool(rungs & {Rung.RETRY, Rung.RESTART})
    stays = fault.holder_alive and fault.kind is not FailureKind.OUT_OF_MEMORY  # OOM: never on a page as small
    if stays and in_place:
        return Replay(f"{where}: the holder lives, its cache is gone; replaying the history on it")
    move = _move(fault, rungs)
    if move is None:
        return Fail(f"{where}: no worker to take the stage over under {policy.level}/{policy.strategy}")
    redistribute, target = move
    if fault.mirrored:
        return Restore(fault.stage, redistribute, f"{where}: {target} takes it over from the cache's copy in Redis")
    return Reroute(fault.stage, redistribute, f"{where}: {target} takes it over; replaying the history")


def _move(fault: SessionFault, rungs: set[Rung]) -> tuple[bool, str] | None:
    """Where the stage can go: (must load the shard first, what it is), or None."""
    if fault.replica and Rung.REROUTE in rungs:
        return False, "a worker already serving it"
    if fault.spare and Rung.REDISTRIBUTE in rungs:
        return True, "a spare worker"
    return None
