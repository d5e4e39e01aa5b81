"""``recovery.session.decide_session``: a generation session's failed step under each level and strategy. Pure."""

from __future__ import annotations

import dataclasses

import pytest

from broker.kinds import FailureKind
from coordinator.recovery.policy import Policy
from coordinator.recovery.session import CURABLE, Fail, Replay, Reroute, Restore, SessionFault, decide_session

LOST = SessionFault(stage=1, kind=FailureKind.WORKER_LOST, error="heartbeat lapsed", holder_alive=False)


def test_a_lost_holder_with_a_copy_in_redis_is_restored_on_a_worker_serving_the_stage() -> None:
    d = decide_session(dataclasses.replace(LOST, mirrored=True, replica=True), Policy())
    assert d == Restore(1, False, d.reason) and "copy in Redis" in d.reason


def test_a_lost_holder_with_only_a_spare_is_restored_there_after_it_loads_the_shard() -> None:
    d = decide_session(dataclasses.replace(LOST, mirrored=True, spare=True), Policy())
    assert isinstance(d, Restore) and d.redistribute and "spare" in d.reason


def test_without_a_copy_the_new_holder_replays_the_history() -> None:
    d = decide_session(dataclasses.replace(LOST, replica=True), Policy())
    assert isinstance(d, Reroute) and d.stage == 1 and not d.redistribute


def test_a_living_holder_that_lost_its_cache_replays_in_place_when_the_ladder_has_an_in_place_rung() -> None:
    fault = SessionFault(1, FailureKind.BROWSER_LOST, "page crashed", holder_alive=True, replica=True)
    assert isinstance(decide_session(fault, Policy("medium", "progressive")), Replay)
    # failover has no retry or restart: the stage moves even though its holder lives
    assert isinstance(decide_session(fault, Policy("medium", "failover")), Reroute)


def test_out_of_memory_never_replays_on_a_page_as_small() -> None:
    fault = SessionFault(0, FailureKind.OUT_OF_MEMORY, "killed by the OOM killer", holder_alive=True, spare=True)
    d = decide_session(fault, Policy("medium"))
    assert isinstance(d, Reroute) and d.redistribute
    assert isinstance(decide_session(dataclasses.replace(fault, spare=False), Policy("medium")), Fail)


@pytest.mark.parametrize(
    ("level", "strategy", "replica", "spare", "want"),
    [
        ("low", "progressive", True, False, Restore),  # low reroutes to a worker that serves the stage
        ("low", "progressive", False, True, Fail),  # ... but never redistributes
        ("medium", "progressive", False, True, Restore),
        ("high", "failover", True, True, Restore),
        ("none", "progressive", True, True, Fail),
    ],
)
def test_the_level_and_strategy_decide_where_the_stage_may_go(
    level: str, strategy: str, replica: bool, spare: bool, want: type
) -> None:
    fault = dataclasses.replace(LOST, mirrored=True, replica=replica, spare=spare)
    assert isinstance(decide_session(fault, Policy(level, strategy)), want)


def test_the_levels_budget_bounds_the_recoveries_of_one_session() -> None:
    policy = Policy("medium")
    _, total = policy.budget
    fault = dataclasses.replace(LOST, mirrored=True, replica=True)
    assert isinstance(decide_session(dataclasses.replace(fault, recoveries=total - 2), policy), Restore)
    spent = decide_session(dataclasses.replace(fault, recoveries=total - 1), policy)
    assert isinstance(spent, Fail) and f"most level medium allows is {total - 1}" in spent.reason
    critical = Policy("critical")
    assert isinstance(decide_session(dataclasses.replace(fault, recoveries=total - 1), critical), Restore)


@pytest.mark.parametrize("kind", sorted(set(FailureKind) - CURABLE))
def test_kinds_a_replay_would_meet_again_end_the_generation(kind: FailureKind) -> None:
    fault = SessionFault(0, kind, "boom", holder_alive=True, mirrored=True, replica=True, spare=True)
    assert isinstance(decide_session(fault, Policy("critical")), Fail)


def test_a_refused_session_is_never_tried_again() -> None:
    fault = dataclasses.replace(LOST, kind=FailureKind.BROWSER_LOST, refused=True, replica=True, mirrored=True)
    d = decide_session(fault, Policy("critical"))
    assert isinstance(d, Fail) and "refused" in d.reason
