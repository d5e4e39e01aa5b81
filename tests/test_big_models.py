"""A model too big for one page: shard sizing against page budgets, num_shards='auto', refusing a count that
cannot fit, and out-of-memory as a known failure that only moves to a larger page. Pure; small models with an
artificially small page budget."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from broker.kinds import FailureKind
from broker.registry import WorkerInfo
from coordinator.errors import ShardTooLarge
from coordinator.manager import ModelShardingManager
from coordinator.model.graph import GraphProfile, load_model, profile_graph
from coordinator.planning.planner import plan_shards
from coordinator.planning.sizedset import parse_num_shards
from coordinator.planning.sizing import (
    WEIGHTS_ONLY,
    MemoryModel,
    auto_plan,
    check_fit,
    gb,
    pages_that_fit,
    shard_fits,
    shard_need_bytes,
)
from coordinator.recovery import (
    DeadLetter,
    Failure,
    Options,
    Policy,
    Redistribute,
    Reroute,
    StageHistory,
    counts_against_worker,
    may_restart,
)
from coordinator.settings import ManagerSettings
from shard_worker.memory import is_out_of_memory
from shard_worker.memory import page_budget_bytes as worker_budget
from tests.onnx_models import residual_mlp, sample_tokens

NO_RUNTIME = MemoryModel(runtime_bytes=0)


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> GraphProfile:
    path = residual_mlp(tmp_path_factory.mktemp("big") / "m.onnx", layers=8, hidden=64)
    model, sha = load_model(path)
    return profile_graph(model, sha)


def whole_need(profile: GraphProfile) -> int:
    return shard_need_bytes(profile, plan_shards(profile, 1).stages[0], NO_RUNTIME)


def test_auto_chooses_the_smallest_count_whose_every_shard_fits(profile: GraphProfile) -> None:
    budget = whole_need(profile) // 3
    sizing = auto_plan(profile, budget, memory=NO_RUNTIME)
    n = sizing.num_shards
    assert n > 1 and all(f.fits for f in sizing.fits) and sizing.budget_bytes == budget
    for share in (0.5, WEIGHTS_ONLY):
        fewer = shard_fits(profile, plan_shards(profile, n - 1, "layer", share), budget, NO_RUNTIME)
        assert not all(f.fits for f in fewer), (n, share)
    assert f": {n} shards" in sizing.reason and "of weights, pages hold" in sizing.reason


def test_auto_is_one_shard_when_the_whole_model_fits(profile: GraphProfile) -> None:
    sizing = auto_plan(profile, whole_need(profile), memory=NO_RUNTIME)
    assert sizing.num_shards == 1 and ": 1 shard," in sizing.reason


def test_a_larger_budget_never_needs_more_shards(profile: GraphProfile) -> None:
    need = whole_need(profile)
    counts = [auto_plan(profile, need * k // 10, memory=NO_RUNTIME).num_shards for k in (2, 3, 5, 10)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_an_explicit_count_that_cannot_fit_is_refused_naming_the_shard_and_sizes(profile: GraphProfile) -> None:
    budget = whole_need(profile) // 3
    plan = plan_shards(profile, 1)
    with pytest.raises(ShardTooLarge) as e:
        check_fit(profile, plan, budget, NO_RUNTIME)
    assert e.value.shard_index == 0 and e.value.budget_bytes == budget and e.value.need_bytes > budget
    assert "shard 0 of 1 does not fit a page" in str(e.value) and "B of weights x2" in str(e.value)
    fits = check_fit(profile, auto_plan(profile, budget, memory=NO_RUNTIME).plan, budget, NO_RUNTIME)
    assert all(f.need_bytes <= budget for f in fits)


def test_a_budget_no_count_can_meet_is_refused(profile: GraphProfile) -> None:
    with pytest.raises(ShardTooLarge) as e:
        auto_plan(profile, 1000, memory=NO_RUNTIME)
    assert "fits pages of" in str(e.value) and e.value.budget_bytes == 1000


def test_a_shard_is_never_placed_on_a_page_it_does_not_fit() -> None:
    def worker(wid: str, budget: int) -> WorkerInfo:
        return WorkerInfo(wid, "chromium", "wasm", "wasm", "", "", "h", 1, 2, 0, page_budget_bytes=budget)

    workers = [worker("small", 1_000), worker("large", 5_000), worker("unknown", 0)]
    assert [w.worker_id for w in pages_that_fit(2_000, workers)] == ["large", "unknown"]
    row = workers[1].to_fields()
    assert WorkerInfo.from_fields("large", row).page_budget_bytes == 5_000
    del row["page_budget_bytes"]  # an older worker's registration
    assert WorkerInfo.from_fields("large", row).page_budget_bytes == 0


# --- out of memory at run time -------------------------------------------------------------------------------

BUDGETS = (("w1", 2_000), ("w2", 2_000), ("w3", 4_000), ("w4", 8_000), ("w5", 1_000))


def oom(worker: str = "w1") -> Failure:
    return Failure("req-1", 0, worker, "chromium", "wasm", FailureKind.OUT_OF_MEMORY, "RangeError: Out of memory")


def test_out_of_memory_is_its_own_kind_never_against_the_worker_nor_restarted() -> None:
    assert FailureKind.parse("out-of-memory") is FailureKind.OUT_OF_MEMORY
    assert not counts_against_worker(FailureKind.OUT_OF_MEMORY) and not may_restart(FailureKind.OUT_OF_MEMORY)


@pytest.mark.parametrize("level", ["low", "medium", "high", "critical"])
def test_out_of_memory_moves_to_a_larger_page_never_one_as_small(level: str) -> None:
    options = Options(replicas=("w2",), spare_workers=("w5", "w3", "w4"), restartable=True, page_budgets_bytes=BUDGETS)
    decision = Policy(level, "progressive").decide(oom(), StageHistory(), options, random.Random(0))
    assert decision == Redistribute("w4")  # w2 is as small as w1, w5 smaller; the largest page first


def test_a_larger_replica_is_rerouted_to_before_a_spare() -> None:
    options = Options(replicas=("w2", "w3"), spare_workers=("w4",), page_budgets_bytes=BUDGETS)
    assert Policy().decide(oom(), StageHistory(), options, random.Random(0)) == Reroute("w3")


def test_out_of_memory_on_the_larger_page_too_dead_letters_with_the_reason() -> None:
    options = Options(replicas=("w2",), spare_workers=("w3", "w4"), page_budgets_bytes=BUDGETS)
    policy, history = Policy("critical", "progressive"), StageHistory()
    first = policy.decide(oom("w1"), history, options, random.Random(0))
    assert first == Redistribute("w4")
    history = history.record(oom("w1"), first)
    second = policy.decide(oom("w4"), history, options, random.Random(0))
    assert isinstance(second, DeadLetter) and second.cause == "memory"
    assert "out of memory, no untried page holds more than 8.0 kB" in second.reason and "w4" in second.reason


def test_out_of_memory_with_no_page_budgets_known_dead_letters() -> None:
    options = Options(replicas=("w2",), spare_workers=("w3",), restartable=True)
    decision = Policy("critical").decide(oom(), StageHistory(), options, random.Random(0))
    assert isinstance(decision, DeadLetter) and decision.cause == "memory"


# --- the manager: num_shards="auto" and a count that cannot fit, refused before anything is enqueued ----------


def budget_for(path: Path, parts: int) -> int:
    model, sha = load_model(path)
    profile = profile_graph(model, sha)
    whole = shard_need_bytes(profile, plan_shards(profile, 1).stages[0])
    runtime = MemoryModel().runtime_bytes
    return runtime + (whole - runtime) // parts


async def test_the_manager_sizes_auto_shards_to_the_page_budget_and_says_why(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=8, hidden=64)
    budget = budget_for(path, 3)
    settings = ManagerSettings(cache_dir=tmp_path / "cache", page_budget_bytes=budget)
    manager = ModelShardingManager(str(path), num_shards="auto", browsers=["chromium"], settings=settings)
    shards = await manager.prepare()
    assert manager.num_shards == len(shards.plan.stages) > 1 and manager.sizing is not None
    assert all(f.need_bytes <= budget for f in manager.sizing.fits)
    assert all(manager.sizing.reason in slot.reason for slot in manager.planned_slots.values())
    assert f"pages hold {gb(budget)} each" in manager.sizing.reason
    await manager.close()


async def test_the_manager_refuses_a_count_that_cannot_fit_before_anything_is_enqueued(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=8, hidden=64)
    budget = budget_for(path, 3)
    settings = ManagerSettings(cache_dir=tmp_path / "cache", page_budget_bytes=budget)
    manager = ModelShardingManager(str(path), num_shards=1, browsers=["chromium"], settings=settings)
    with pytest.raises(ShardTooLarge, match=r"shard 0 of 1 does not fit a page: it needs .* and pages hold"):
        await manager.prepare()
    assert not (tmp_path / "cache" / "shards").exists()  # no shard file written, nothing to enqueue
    assert not await manager.initialize_sharding() and "does not fit a page" in (manager.last_error or "")
    assert manager.broker_url is None  # no broker was started
    await manager.close()


@pytest.mark.parametrize("value", ["0", "-2", "many", ""])
def test_num_shards_is_a_positive_count_or_auto(value: str) -> None:
    assert parse_num_shards("auto") == "auto" and parse_num_shards("3") == 3
    with pytest.raises(ValueError):
        parse_num_shards(value)


# --- the worker's side: an out-of-memory page error and the registered budget -------------------------------


@pytest.mark.parametrize(
    "error",
    [
        "RangeError: WebAssembly.Memory.grow(): Maximum memory size exceeded",
        "RangeError: Array buffer allocation failed",
        "Can't create a session. ERROR_CODE: 6, ERROR_MESSAGE: std::bad_alloc",
        "InternalError: out of memory",
        "Aborted(OOM)",
        "Cannot enlarge memory arrays to size 4294967296 bytes",
    ],
)
def test_a_page_that_ran_out_of_memory_is_reported_as_such(error: str) -> None:
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", ["input 'x' has shape [2,3], expected [2,4]", "Kernel MatMul failed: bad dims"])
def test_other_page_errors_are_not_out_of_memory(error: str) -> None:
    assert not is_out_of_memory(error)


def test_the_registered_budget_is_the_measured_one_capped_by_the_setting() -> None:
    caps = {"memory": {"budget_bytes": 4_000}}
    assert worker_budget(caps) == 4_000 and worker_budget(caps, 1_000) == 1_000 and worker_budget(caps, 9_000) == 4_000
    assert worker_budget({}) == 0 and worker_budget({}, 1_000) == 1_000


def test_xshard_run_refuses_a_count_that_cannot_fit_before_any_browser_starts(tmp_path: Path) -> None:
    path = residual_mlp(tmp_path / "m.onnx", layers=8, hidden=64)
    inputs = tmp_path / "in.npz"
    np.savez(inputs, **sample_tokens(1, 5))
    env = {
        **os.environ,
        "XSHARD_CACHE_DIR": str(tmp_path / "cache"),
        "XSHARD_PAGE_BUDGET_BYTES": str(budget_for(path, 3)),
    }
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--model", str(path), "--shards", "1"]
    cmd += ["--inputs", str(inputs), "--output", str(tmp_path / "out.npz")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("xshard: error: shard 0 of 1 does not fit a page: it needs"), line
    assert not (tmp_path / "cache" / "logs").exists(), "a worker was started"
