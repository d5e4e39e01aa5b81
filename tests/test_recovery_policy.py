"""Recovery policies: backoff, circuit breakers, the level/strategy ladder and the decision. Pure, no Redis."""

from __future__ import annotations

import importlib
import itertools
import json
import random
from collections.abc import Callable, Sequence

import pytest

from broker.errors import SettingError
from broker.kinds import FailureKind
from coordinator.errors import XshardError
from coordinator.recovery import (
    FAILURE_KINDS,
    FAULT_TOLERANCE_LEVELS,
    RECOVERY_STRATEGIES,
    Backoff,
    Breakers,
    BreakerState,
    ChangePlatform,
    CircuitBreaker,
    DeadLetter,
    Decision,
    Failure,
    IllegalTransition,
    Options,
    OrphanPlan,
    Policy,
    RecoveryError,
    Redistribute,
    Reroute,
    Restart,
    RestartBudget,
    Retry,
    Rung,
    StageHistory,
    UnknownSetting,
    counts_against_worker,
    decide_orphan,
    describe_table,
    ladder,
    may_restart,
    runs_in_parallel,
    transition,
)

# The package exports the function ``ladder``, which shadows the submodule of the same name as an attribute.
ladder_module = importlib.import_module("coordinator.recovery.ladder")

NO_JITTER = Backoff(base_s=0.05, factor=2.0, max_s=2.0, jitter=0.0)


def fail(
    kind: str = "kernel",
    worker: str | None = "w1",
    platform: str | None = "webgpu",
    attempt: int = 1,
    error: str = "RuntimeError: kernel MatMul failed",
) -> Failure:
    return Failure("req-1", 0, worker, "chromium", platform, kind, error, attempt)  # type: ignore[arg-type]


def assert_sound(failure: Failure, history: StageHistory, decision: Decision) -> None:
    """What must hold for every decision, whatever the level, strategy and options."""
    if failure.kind == "input":
        assert isinstance(decision, DeadLetter)
    if failure.kind == "worker-lost":
        assert not isinstance(decision, Retry | Restart)
        assert getattr(decision, "worker_id", None) != failure.worker_id
    if isinstance(decision, Reroute | Redistribute):
        assert decision.worker_id not in {*history.workers_tried, failure.worker_id}
    if isinstance(decision, ChangePlatform):
        assert decision.platform not in {*history.platforms_tried, failure.platform}
    if isinstance(decision, Retry):
        assert 0.0 <= decision.delay_s <= policy_max_delay_s


policy_max_delay_s = Backoff().max_s


def walk(
    policy: Policy,
    options: Options,
    kinds: Sequence[str] | None = None,
    *,
    seed: int = 0,
    worker: str = "w1",
    platform: str = "webgpu",
    kind_of: Callable[[int], str] | None = None,
) -> list[Decision]:
    """The caller's one loop, with every try failing: decide, record, try again, until a dead letter."""
    rng = random.Random(seed)
    history = StageHistory()
    decisions: list[Decision] = []
    for attempt in itertools.count(1):
        assert attempt <= 100, "the policy never gave up"
        kind = kinds[min(attempt - 1, len(kinds) - 1)] if kinds else "kernel"
        if kind_of is not None:
            kind = kind_of(attempt)
        failure = fail(kind, worker, platform, attempt)
        decision = policy.decide(failure, history, options, rng)
        assert_sound(failure, history, decision)
        decisions.append(decision)
        if isinstance(decision, DeadLetter):
            return decisions
        history = history.record(failure, decision)
        if decision.worker_id is not None:
            worker = decision.worker_id
        if isinstance(decision, ChangePlatform):
            platform = decision.platform
    raise AssertionError("unreachable")


# --- backoff -------------------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_from_base_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [NO_JITTER.delay_s(n, rng) for n in range(1, 9)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    assert NO_JITTER.delay_s(10_000, rng) == 2.0  # no overflow far past the cap


def test_backoff_jitter_is_proportional_and_deterministic_for_a_seed() -> None:
    backoff = Backoff()  # jitter 0.5: each delay within [cap / 2, cap]
    first = [backoff.delay_s(n, random.Random(7)) for n in range(1, 12)]
    again = [backoff.delay_s(n, random.Random(7)) for n in range(1, 12)]
    assert first == again
    for n, delay in enumerate(first, start=1):
        cap = backoff.cap_s(n)
        assert cap * 0.5 <= delay <= cap <= backoff.max_s
    assert 0.025 <= backoff.delay_s(1, random.Random(3)) <= 0.05  # attempt 1 waits about base_s
    rng = random.Random(11)
    assert len({backoff.delay_s(3, rng) for _ in range(20)}) > 1  # jitter actually spreads the delays


def test_full_jitter_spans_zero_to_the_cap() -> None:
    backoff = Backoff(jitter=1.0)
    rng = random.Random(5)
    delays = [backoff.delay_s(4, rng) for _ in range(500)]
    assert all(0.0 <= d <= 0.4 for d in delays)
    assert min(delays) < 0.05 and max(delays) > 0.35


@pytest.mark.parametrize(
    "kwargs",
    [{"base_s": 0.0}, {"factor": 0.5}, {"max_s": 0.01}, {"jitter": 1.5}, {"max_s": float("inf")}],
)
def test_backoff_refuses_settings_that_are_not_finite_and_sane(kwargs: dict[str, float]) -> None:
    with pytest.raises(SettingError):
        Backoff(**kwargs)


def test_backoff_attempts_are_one_based() -> None:
    with pytest.raises(SettingError):
        Backoff().delay_s(0, random.Random(0))


# --- circuit breakers ----------------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures_and_success_resets_the_count() -> None:
    b = CircuitBreaker(failure_threshold=3, cooldown_s=5.0)
    b.record_failure(0.0)
    b.record_failure(0.1)
    b.record_success(0.2)
    b.record_failure(0.3)
    b.record_failure(0.4)
    assert b.state(0.4) is BreakerState.CLOSED and b.allows(0.4)
    b.record_failure(0.5)
    assert b.state(0.5) is BreakerState.OPEN and not b.allows(0.5)
    assert b.opened_at_s == 0.5


def test_open_breaker_goes_half_open_after_cooldown_and_a_success_closes_it() -> None:
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5.0)
    b.record_failure(10.0)
    assert not b.allows(14.9)
    assert b.state(15.0) is BreakerState.HALF_OPEN and b.allows(15.0)
    b.record_success(15.2)
    assert b.state(15.2) is BreakerState.CLOSED and b.consecutive_failures == 0 and b.opened_at_s is None


def test_half_open_failure_reopens_and_restarts_the_cooldown() -> None:
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_failure(1.5)  # the half-open trial failed
    assert b.state(1.5) is BreakerState.OPEN and b.opened_at_s == 1.5
    assert not b.allows(2.4) and b.allows(2.5)


def test_late_results_while_open_neither_close_it_nor_extend_the_cooldown() -> None:
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5.0)
    b.record_failure(0.0)
    b.record_success(1.0)
    assert b.state(1.0) is BreakerState.OPEN
    b.record_failure(2.0)
    assert b.opened_at_s == 0.0 and b.allows(5.0)


def test_breaker_state_and_allows_only_look_and_never_move_the_machine() -> None:
    b = CircuitBreaker(failure_threshold=1, cooldown_s=1.0)
    b.record_failure(0.0)
    assert b.state(100.0) is BreakerState.HALF_OPEN
    assert b.state(0.5) is BreakerState.OPEN  # looking at a later time did not move it


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (BreakerState.CLOSED, BreakerState.HALF_OPEN),
        (BreakerState.CLOSED, BreakerState.CLOSED),
        (BreakerState.OPEN, BreakerState.CLOSED),
        (BreakerState.OPEN, BreakerState.OPEN),
        (BreakerState.HALF_OPEN, BreakerState.HALF_OPEN),
    ],
)
def test_illegal_breaker_transition_is_refused_with_a_typed_error(current: BreakerState, target: BreakerState) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(current, target)
    assert isinstance(info.value, RecoveryError) and isinstance(info.value, XshardError)
    assert info.value.current == current.value and info.value.target == target.value


def test_legal_breaker_transitions_are_allowed() -> None:
    assert transition(BreakerState.CLOSED, BreakerState.OPEN) is BreakerState.OPEN
    assert transition(BreakerState.OPEN, BreakerState.HALF_OPEN) is BreakerState.HALF_OPEN
    assert transition(BreakerState.HALF_OPEN, BreakerState.CLOSED) is BreakerState.CLOSED
    assert transition(BreakerState.HALF_OPEN, BreakerState.OPEN) is BreakerState.OPEN


def test_breakers_keyed_by_worker_and_browser_platform_give_a_json_snapshot() -> None:
    breakers = Breakers(failure_threshold=2, cooldown_s=3.0)
    assert breakers.allows("never-seen", 0.0)
    for now_s in (1.0, 2.0):
        breakers.record("w1", False, now_s)
        breakers.record(("firefox", "webgpu"), False, now_s)
    breakers.record("w2", True, 2.0)
    assert not breakers.allows("w1", 2.5) and not breakers.allows(("firefox", "webgpu"), 2.5)
    assert breakers.allows("w2", 2.5)
    assert set(breakers.open_keys(2.5)) == {"w1", ("firefox", "webgpu")}
    snap = breakers.snapshot(2.5)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["w1"] == {"state": "open", "consecutive_failures": 2, "opened_at_s": 2.0}
    assert snap["firefox/webgpu"]["state"] == "open"
    assert snap["w2"] == {"state": "closed", "consecutive_failures": 0, "opened_at_s": None}
    assert breakers.snapshot(5.0)["w1"]["state"] == "half-open"
    breakers.record("w1", True, 5.0)
    assert breakers.state("w1", 5.0) is BreakerState.CLOSED


def test_breaker_settings_must_be_finite_and_positive() -> None:
    with pytest.raises(UnknownSetting):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(UnknownSetting):
        Breakers(cooldown_s=float("inf"))


def test_only_the_workers_fault_counts_against_its_breaker() -> None:
    assert {k for k in FAILURE_KINDS if counts_against_worker(k)} == {
        "kernel",
        "browser-lost",
        "worker-lost",
        "timeout",
    }


# --- the ladder ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", FAULT_TOLERANCE_LEVELS)
@pytest.mark.parametrize("strategy", RECOVERY_STRATEGIES)
def test_every_level_and_strategy_yields_a_finite_ladder_ending_in_dead_letter(level: str, strategy: str) -> None:
    rungs = ladder(level, strategy)
    assert rungs[-1] is Rung.DEAD_LETTER and rungs.count(Rung.DEAD_LETTER) == 1
    assert len(set(rungs)) == len(rungs) <= len(Rung)


def test_level_none_goes_straight_to_the_dead_letter() -> None:
    assert all(ladder("none", s) == (Rung.DEAD_LETTER,) for s in RECOVERY_STRATEGIES)


@pytest.mark.parametrize("strategy", RECOVERY_STRATEGIES)
def test_each_level_reaches_at_least_as_far_as_the_one_below(strategy: str) -> None:
    reach = [set(ladder(level, strategy)) for level in FAULT_TOLERANCE_LEVELS]
    assert all(lower <= higher for lower, higher in itertools.pairwise(reach))
    assert set(ladder("critical", strategy)) == set(Rung)  # critical: everything


def test_level_decides_reach_and_strategy_decides_order() -> None:
    r = Rung
    assert ladder("low", "progressive") == (r.RETRY, r.REROUTE, r.DEAD_LETTER)
    assert ladder("medium", "progressive") == (r.RETRY, r.RESTART, r.REROUTE, r.REDISTRIBUTE, r.DEAD_LETTER)
    guide = (r.RETRY, r.RESTART, r.REROUTE, r.CHANGE_PLATFORM, r.REDISTRIBUTE, r.DEAD_LETTER)
    assert ladder("high", "progressive") == guide == ladder("high", "parallel") == ladder("high", "reconnect")
    assert ladder("medium", "restart")[0] is r.RESTART
    assert ladder("high", "failover") == (r.REROUTE, r.REDISTRIBUTE, r.CHANGE_PLATFORM, r.DEAD_LETTER)
    assert ladder("critical", "failover")[-3:] == (r.RETRY, r.RESTART, r.DEAD_LETTER)
    assert all(r.CHANGE_PLATFORM not in ladder(level, s) for level in ("low", "medium") for s in RECOVERY_STRATEGIES)


def test_only_parallel_runs_jobs_on_two_workers_and_not_at_level_none() -> None:
    assert [s for s in RECOVERY_STRATEGIES if runs_in_parallel(s)] == ["parallel"]
    assert not runs_in_parallel("parallel", "none")
    assert Policy(strategy="parallel").runs_in_parallel and not Policy().runs_in_parallel


def test_unknown_level_or_strategy_is_refused_with_a_typed_error() -> None:
    with pytest.raises(UnknownSetting, match="fault_tolerance_level"):
        ladder("extreme", "progressive")
    with pytest.raises(UnknownSetting, match="recovery_strategy"):
        ladder("high", "pray")
    with pytest.raises(ValueError):
        Policy(level="maximum")


def test_describe_table_lists_every_level_and_strategy_and_matches_the_module_docstring() -> None:
    table = describe_table()
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:] == list(RECOVERY_STRATEGIES)
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(FAULT_TOLERANCE_LEVELS)
    assert all(line.count("|") == len(RECOVERY_STRATEGIES) + 3 for line in lines)
    assert "| none | 0 / 1 | dead letter |" in table and "| critical | 4 / 12 |" in table
    assert "retry (same worker)" in table and "2 workers per job" in table
    assert table in (ladder_module.__doc__ or ""), "the docstring's copy of the table is stale"


# --- the decision --------------------------------------------------------------------------------------------

EVERYTHING = Options(
    replicas=("w2", "w3"),
    spare_workers=("w4",),
    alternative_platforms=(("w1", "wasm"), ("w2", "wasm")),
    restartable=True,
)


@pytest.mark.parametrize("level", FAULT_TOLERANCE_LEVELS)
@pytest.mark.parametrize("strategy", RECOVERY_STRATEGIES)
def test_input_failures_are_dead_lettered_at_once_and_never_retried(level: str, strategy: str) -> None:
    decision = Policy(level, strategy).decide(
        fail("input", error="DecodeError: bad dtype"), StageHistory(), EVERYTHING, random.Random(0)
    )
    assert isinstance(decision, DeadLetter) and decision.cause == "input"
    assert "never retried" in decision.reason and "DecodeError: bad dtype" in decision.reason
    assert "req-1" in decision.reason and decision.rung is Rung.DEAD_LETTER


@pytest.mark.parametrize("strategy", RECOVERY_STRATEGIES)
def test_level_none_dead_letters_the_first_failure(strategy: str) -> None:
    decision = Policy("none", strategy).decide(fail("timeout"), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, DeadLetter) and decision.cause == "disabled"
    assert "timeout on w1" in decision.reason


def test_kernel_error_is_retried_with_backoff_then_rerouted_then_dead_lettered() -> None:
    policy = Policy("low", "progressive", backoff=NO_JITTER)
    decisions = walk(policy, Options(replicas=("w2",)), ["kernel"])
    assert decisions[:3] == [Retry(0.05), Retry(0.1), Reroute("w2")]
    last = decisions[-1]
    assert len(decisions) == 4 and isinstance(last, DeadLetter) and last.cause == "poison"  # it threw on w1 and w2
    assert "retry×2 (pool)" in last.reason and "reroute×1 (w2)" in last.reason
    assert "workers: w1, w2" in last.reason and "kernel MatMul failed" in last.reason


def test_reconnect_retries_on_the_same_worker_first() -> None:
    decision = Policy("medium", "reconnect").decide(fail("timeout"), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, Retry) and decision.worker_id == "w1"


def test_restart_strategy_restarts_the_browser_first() -> None:
    decision = Policy("medium", "restart").decide(fail("kernel"), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, Restart) and decision.worker_id == "w1" and decision.delay_s <= 0.05


def test_failover_moves_away_at_once() -> None:
    decisions = walk(Policy("high", "failover"), EVERYTHING, ["timeout"])
    assert decisions[:3] == [Reroute("w2"), Reroute("w3"), Redistribute("w4")]
    assert not any(isinstance(d, Retry | Restart) for d in decisions)


def test_lost_browser_is_restarted_not_retried() -> None:
    decision = Policy().decide(fail("browser-lost"), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, Restart) and decision.worker_id == "w1"


@pytest.mark.parametrize("strategy", RECOVERY_STRATEGIES)
def test_worker_lost_never_retries_or_restarts_on_the_lost_worker(strategy: str) -> None:
    policy = Policy("critical", strategy)
    decision = policy.decide(fail("worker-lost"), StageHistory(), EVERYTHING, random.Random(0))
    assert decision == Reroute("w2")
    alone = Options(spare_workers=("w4",), restartable=True)
    assert policy.decide(fail("worker-lost"), StageHistory(), alone, random.Random(0)) == Redistribute("w4")
    for d in walk(policy, EVERYTHING, ["worker-lost"]):
        assert not isinstance(d, Retry | Restart)
        assert getattr(d, "worker_id", None) != "w1"


def test_reroute_picks_a_replica_not_already_tried() -> None:
    history = StageHistory().with_attempt(Rung.REROUTE, "w2", None, failure=fail("timeout", worker="w1"))
    decision = Policy("low", "failover").decide(
        fail("timeout", worker="w2", attempt=2), history, Options(replicas=("w1", "w2", "w3")), random.Random(0)
    )
    assert decision == Reroute("w3")


def test_redistribute_loads_the_shard_elsewhere_when_no_replica_is_left() -> None:
    options = Options(replicas=(), spare_workers=("w1", "w5", "w6"))
    decision = Policy("medium", "failover").decide(fail("worker-lost"), StageHistory(), options, random.Random(0))
    assert decision == Redistribute("w5")  # w1 is the lost one


def test_every_stage_worker_gone_is_redistributed_at_the_default_level() -> None:
    decisions = walk(Policy(), Options(spare_workers=("w7", "w8")), ["worker-lost"])
    assert decisions[:2] == [Redistribute("w7"), Redistribute("w8")]
    assert isinstance(decisions[-1], DeadLetter)


def test_change_platform_from_webgpu_goes_to_wasm_and_wasm_has_nowhere_to_go() -> None:
    policy = Policy("high", "failover")
    options = Options(alternative_platforms=(("w2", "wasm"), ("w1", "wasm"), ("w1", "webnn")))
    decision = policy.decide(fail("kernel", platform="webgpu"), StageHistory(), options, random.Random(0))
    assert decision == ChangePlatform("w1", "wasm")  # in place first: the browser is fine, its provider is not
    on_wasm = policy.decide(fail("kernel", platform="wasm"), StageHistory(), options, random.Random(0))
    assert isinstance(on_wasm, DeadLetter) and "no provider to fall back to from wasm" in on_wasm.reason


def test_change_platform_from_webnn_prefers_webgpu_then_wasm_and_never_revisits_a_provider() -> None:
    policy = Policy("high", "failover")
    options = Options(alternative_platforms=(("w1", "wasm"), ("w2", "webgpu")))
    first = policy.decide(fail("kernel", platform="webnn"), StageHistory(), options, random.Random(0))
    assert first == ChangePlatform("w2", "webgpu")
    history = StageHistory().record(fail("kernel", platform="webnn"), first)
    second = policy.decide(
        fail("timeout", worker="w2", platform="webgpu", attempt=2), history, options, random.Random(0)
    )
    assert second == ChangePlatform("w1", "wasm")
    history = history.record(fail("timeout", worker="w2", platform="webgpu", attempt=2), second)
    third = policy.decide(fail("timeout", worker="w1", platform="wasm", attempt=3), history, options, random.Random(0))
    assert isinstance(third, DeadLetter) and "platforms: webnn, webgpu, wasm" in third.reason


def test_change_platform_is_not_offered_below_level_high() -> None:
    options = Options(alternative_platforms=(("w1", "wasm"),))
    for level in ("low", "medium"):
        assert not any(isinstance(d, ChangePlatform) for d in walk(Policy(level), options, ["timeout"]))


def test_kernel_error_right_after_a_restart_is_not_restarted_again() -> None:
    policy = Policy("medium", "restart")
    history = StageHistory().record(fail("browser-lost"), Restart("w1"))
    decision = policy.decide(fail("kernel", attempt=2), history, Options(restartable=True), random.Random(0))
    assert isinstance(decision, Retry)
    after_timeout = policy.decide(fail("timeout", attempt=2), history, Options(restartable=True), random.Random(0))
    assert isinstance(after_timeout, Restart)


def test_poison_input_that_crashes_browsers_on_two_workers_is_dead_lettered_as_poison() -> None:
    policy = Policy("critical", "progressive")
    history = StageHistory().record(fail("browser-lost", worker="w1"), Reroute("w2"))
    options = Options(replicas=("w1", "w3"), spare_workers=("w4",), restartable=True)
    decision = policy.decide(fail("browser-lost", worker="w2", attempt=2), history, options, random.Random(0))
    assert isinstance(decision, DeadLetter) and decision.cause == "poison"
    assert "poison input: browser-lost on 2 workers (w1, w2)" in decision.reason


def test_poison_kernel_error_may_still_change_platform_at_level_high() -> None:
    policy = Policy("high", "progressive")
    history = StageHistory().record(fail("kernel", worker="w1"), Reroute("w2"))
    decision = policy.decide(fail("kernel", worker="w2", attempt=2), history, EVERYTHING, random.Random(0))
    assert decision == ChangePlatform("w2", "wasm")


def test_same_worker_failing_repeatedly_is_not_mistaken_for_poison() -> None:
    decisions = walk(
        Policy("medium", "progressive"), Options(restartable=True, replicas=("w2",)), kind_of=lambda attempt: "kernel"
    )
    assert [d.rung for d in decisions[:3]] == [Rung.RETRY, Rung.RETRY, Rung.RESTART]


def test_unavailable_stage_waits_with_backoff_then_redistributes() -> None:
    policy = Policy("medium", "progressive", backoff=NO_JITTER)
    decisions = walk(policy, Options(spare_workers=("w9",)), ["unavailable"], worker="")
    assert decisions[:3] == [Retry(0.05), Retry(0.1), Redistribute("w9")]


def test_dead_letter_reason_names_the_rungs_workers_platforms_and_last_error() -> None:
    decisions = walk(Policy("medium", "progressive"), EVERYTHING, ["timeout"])
    last = decisions[-1]
    assert isinstance(last, DeadLetter) and last.cause == "budget"
    for needle in (
        "6 of 6 attempts spent",
        "medium/progressive",
        "retry×2 (pool)",
        "restart×2 (w1)",
        "reroute×1 (w2)",
        "workers: w1, w2",
        "platforms: webgpu",
        "timeout on w2",
        "attempt 6",
    ):
        assert needle in last.reason


def test_critical_allows_twice_the_attempts_of_high() -> None:
    assert Policy("critical").budget == (4, 12) and Policy("high").budget == (2, 6)
    options = Options(restartable=True, replicas=("w1",))
    assert len(walk(Policy("critical"), options, ["timeout"])) > len(walk(Policy("high"), options, ["timeout"]))


def test_max_total_attempts_bounds_the_walk_for_random_failure_sequences() -> None:
    pool = [f"w{i}" for i in range(8)]
    platforms = ("webnn", "webgpu", "wasm")
    for seed in range(600):
        rng = random.Random(seed)
        policy = Policy(
            rng.choice(FAULT_TOLERANCE_LEVELS),
            rng.choice(RECOVERY_STRATEGIES),
            max_attempts_per_rung=rng.randint(1, 4),
            max_total_attempts=rng.randint(1, 9),
            poison_after_workers=rng.randint(1, 4),
        )
        options = Options(
            replicas=tuple(rng.sample(pool, rng.randint(0, 5))),
            spare_workers=tuple(rng.sample(pool, rng.randint(0, 5))),
            alternative_platforms=tuple((rng.choice(pool), rng.choice(platforms)) for _ in range(rng.randint(0, 4))),
            restartable=rng.random() < 0.5,
        )
        kinds = [rng.choice(FAILURE_KINDS) for _ in range(30)]
        decisions = walk(policy, options, kinds, seed=seed, platform=rng.choice(platforms))
        _, total = policy.budget
        assert len(decisions) <= total, (seed, policy, decisions)
        assert isinstance(decisions[-1], DeadLetter) and decisions[-1].reason
        assert not any(isinstance(d, DeadLetter) for d in decisions[:-1])


def test_decisions_are_deterministic_for_a_seed() -> None:
    policy = Policy("critical", "parallel")
    assert walk(policy, EVERYTHING, ["timeout"], seed=42) == walk(policy, EVERYTHING, ["timeout"], seed=42)


def test_stage_history_is_immutable_and_counts_the_failed_worker_and_platform() -> None:
    empty = StageHistory()
    history = empty.record(fail("timeout", worker="w1", platform="webgpu"), Retry(0.05))
    assert empty == StageHistory() and history.tried == ((Rung.RETRY, ""),)
    assert history.workers_tried == ("w1",) and history.platforms_tried == ("webgpu",)
    assert history.failures == (("timeout", "w1", "webgpu"),) and history.count(Rung.RETRY) == 1
    with pytest.raises(AttributeError):
        history.tried = ()  # type: ignore[misc]
    with pytest.raises(UnknownSetting):
        history.record(fail(), DeadLetter("done"))


def test_failure_refuses_an_unknown_kind() -> None:
    with pytest.raises(UnknownSetting):
        fail("cosmic-ray")


def test_policy_from_env_reads_level_and_strategy_and_refuses_nonsense() -> None:
    env = {
        "XSHARD_FAULT_TOLERANCE_LEVEL": "High",
        "XSHARD_RECOVERY_STRATEGY": "failover",
        "XSHARD_MAX_TOTAL_ATTEMPTS": "9",
    }
    policy = Policy.from_env(env, max_attempts_per_rung=3, strategy=None)
    assert (policy.level, policy.strategy, policy.max_total_attempts, policy.max_attempts_per_rung) == (
        "high",
        "failover",
        9,
        3,
    )
    with pytest.raises(UnknownSetting):
        Policy.from_env({"XSHARD_MAX_TOTAL_ATTEMPTS": "forever"})
    with pytest.raises(UnknownSetting):
        Policy(max_total_attempts=0)


# --- the request's own limit, what each failure kind allows, an orphaned stage ----------------------------


def limited(kind: str, attempt: int, limit: int | None, worker: str = "w1") -> Failure:
    return Failure("req-1", 0, worker, "chromium", "webgpu", kind, "boom", attempt, limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", ["low", "medium", "critical"])
def test_the_requests_own_attempt_limit_dead_letters_within_a_larger_level_budget(level: str) -> None:
    policy = Policy(level, "progressive")
    assert not isinstance(
        policy.decide(limited("timeout", 2, 3), StageHistory(), EVERYTHING, random.Random(0)), DeadLetter
    )
    decision = policy.decide(limited("timeout", 3, 3), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, DeadLetter) and decision.cause == "budget"
    assert "max_retries exhausted after 3 attempt(s)" in decision.reason and "boom" in decision.reason


def test_a_limit_larger_than_the_level_budget_does_not_extend_it() -> None:
    decision = Policy("medium").decide(limited("timeout", 6, 100), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, DeadLetter) and "6 of 6 attempts spent" in decision.reason


def test_a_walk_never_tries_a_stage_more_often_than_the_request_allows() -> None:
    stopped_by_the_limit = 0
    for seed in range(50):
        rng = random.Random(seed)
        limit = rng.randint(1, 4)
        history, worker = StageHistory(), "w1"
        for attempt in itertools.count(1):
            failure = limited(rng.choice(["kernel", "timeout", "unavailable"]), attempt, limit, worker)
            decision = Policy("critical").decide(failure, history, EVERYTHING, rng)
            if isinstance(decision, DeadLetter):
                break
            history = history.record(failure, decision)
            worker = decision.worker_id or worker
        assert attempt <= limit, (seed, limit, attempt)
        stopped_by_the_limit += "max_retries exhausted" in decision.reason
    assert stopped_by_the_limit > 25


def test_zero_retries_still_names_a_bad_input_as_such() -> None:
    decision = Policy().decide(limited("input", 1, 1), StageHistory(), EVERYTHING, random.Random(0))
    assert isinstance(decision, DeadLetter) and decision.cause == "input"


def test_only_a_failure_a_browser_restart_can_cure_restarts_it() -> None:
    assert {k for k in FailureKind if may_restart(k)} == {
        FailureKind.KERNEL,
        FailureKind.TIMEOUT,
        FailureKind.BROWSER_LOST,
    }
    policy = Policy("medium", "restart")
    for kind in FailureKind:
        if kind is FailureKind.INPUT:
            continue
        decision = policy.decide(fail(kind.value), StageHistory(), EVERYTHING, random.Random(0))
        assert isinstance(decision, Restart) == may_restart(kind), (kind, decision)


def test_a_kind_a_restart_cures_still_needs_a_live_worker_to_restart() -> None:
    dead = Options(replicas=("w2",), restartable=False)
    decision = Policy("medium", "restart").decide(fail("kernel"), StageHistory(), dead, random.Random(0))
    assert not isinstance(decision, Restart)


def test_failure_kinds_are_the_brokers_enum_and_wire_strings_are_accepted() -> None:
    assert FAILURE_KINDS == tuple(FailureKind)
    failure = fail("browser-lost")
    assert failure.kind is FailureKind.BROWSER_LOST and failure.kind == "browser-lost"
    with pytest.raises(UnknownSetting):
        limited("timeout", 1, 0)


def test_a_stage_that_still_has_a_live_replica_is_not_orphaned() -> None:
    assert decide_orphan(1, replicas=("w2",), spares=("w3",), died=("w1",)) is None


def test_an_orphaned_stage_tries_each_spare_in_order_and_never_a_dead_worker() -> None:
    plan = decide_orphan(2, replicas=(), spares=("w3", "w1", "w4", "w3"), died=("w1", "w5"))
    assert plan == OrphanPlan(2, "w1", (Redistribute("w3"), Redistribute("w4")), "stage 2 lost its only worker w1")


def test_an_orphaned_stage_with_no_spare_is_left_uncovered_and_says_why() -> None:
    plan = decide_orphan(0, replicas=(), spares=("w1",), died=("w1",))
    assert plan is not None and plan.tries == () and plan.lost_worker == "w1"
    assert "no spare worker" in plan.reason and "stage 0 lost its only worker w1" in plan.reason
    unknown = decide_orphan(3, replicas=(), spares=(), died=())
    assert unknown is not None and unknown.lost_worker == "" and "stage 3 has no worker" in unknown.reason


# -- the worker's own browser-restart budget (broker.restarts, applied by the worker) -----------------------


def test_restart_budget_allows_max_restarts_within_the_window_and_refuses_the_next() -> None:
    budget = RestartBudget(max_restarts=3, window_s=60.0)
    times: tuple[float, ...] = ()
    for now_s in (100.0, 101.0, 102.0):
        verdict = budget.decide(times, now_s)
        assert verdict.allowed and verdict.reason == "", verdict
        times = verdict.kept_times_s
    assert times == (100.0, 101.0, 102.0)
    refused = budget.decide(times, 103.0)
    assert not refused.allowed
    assert refused.reason == "browser restarted 3 times in 60s"
    assert refused.kept_times_s == (100.0, 101.0, 102.0, 103.0)


def test_restart_budget_forgets_restarts_older_than_its_window() -> None:
    budget = RestartBudget(max_restarts=2, window_s=10.0)
    verdict = budget.decide([0.0, 5.0], 10.0)  # 0.0 is exactly one window old: out
    assert verdict.allowed and verdict.kept_times_s == (5.0, 10.0)
    assert not budget.decide(verdict.kept_times_s, 14.0).allowed
    assert budget.decide(verdict.kept_times_s, 15.0).kept_times_s == (10.0, 15.0)


def test_restart_budget_is_pure_and_its_defaults_are_the_workers() -> None:
    budget = RestartBudget()
    assert (budget.max_restarts, budget.window_s) == (5, 60.0)
    recent = [1.0, 2.0]
    assert budget.decide(recent, 3.0) == budget.decide(recent, 3.0)
    assert recent == [1.0, 2.0]
    with pytest.raises(AttributeError):
        budget.max_restarts = 9  # type: ignore[misc]
    assert RestartBudget is importlib.import_module("broker.restarts").RestartBudget  # one rule, both sides


def test_restart_budget_refuses_nonsense_and_zero_allows_no_restart() -> None:
    for bad in ({"max_restarts": -1}, {"window_s": 0.0}, {"window_s": float("inf")}, {"window_s": float("nan")}):
        with pytest.raises(SettingError):
            RestartBudget(**bad)  # type: ignore[arg-type]
    never = RestartBudget(max_restarts=0)
    verdict = never.decide((), 0.0)
    assert not verdict.allowed and verdict.reason == "browser restarted 0 times in 60s"
