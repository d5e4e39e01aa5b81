"""The hosting policy, pure: consecutive shards share a browser under a cap, and threads are shared out."""

from __future__ import annotations

from broker.registry import WorkerInfo
from coordinator.planning.allocation import Slot
from coordinator.planning.hosting import MAX_WASM_THREADS, host_groups, wasm_threads
from coordinator.runtime.placement import match_browsers


def slots(*browsers: str) -> dict[int, Slot]:
    return {i: Slot(b, "wasm", "", f"asked for {b}") for i, b in enumerate(browsers)}


def test_without_a_binding_cap_every_shard_gets_its_own_browser() -> None:
    groups, hosted = host_groups(slots("chromium", "firefox", "chromium"), 4)
    assert [g.shards for g in groups] == [(0,), (1,), (2,)]
    assert [g.browser for g in groups] == ["chromium", "firefox", "chromium"]
    assert hosted == slots("chromium", "firefox", "chromium")


def test_a_cap_cuts_the_shards_into_runs_of_consecutive_shards_as_even_as_it_can() -> None:
    groups, _ = host_groups(slots(*["chromium"] * 6), 4)
    assert [g.shards for g in groups] == [(0, 1), (2, 3), (4,), (5,)]
    groups, _ = host_groups(slots(*["chromium"] * 3), 1)
    assert [g.shards for g in groups] == [(0, 1, 2)]


def test_a_shard_in_another_shards_browser_says_so_in_its_reason() -> None:
    groups, hosted = host_groups(slots("chromium", "firefox", "chromium"), 2)
    assert [(g.shards, g.browser) for g in groups] == [((0, 1), "chromium"), ((2,), "chromium")]
    assert hosted[1].browser == "chromium"
    assert "shares shard 0's chromium (max_connections=2)" in hosted[1].reason
    assert hosted[1].reason.startswith("asked for firefox")
    assert hosted[0] == slots("chromium")[0]


def test_threads_share_out_the_cores_between_the_browsers_of_the_machine() -> None:
    assert wasm_threads(cores=2, browsers=3) == 1
    assert wasm_threads(cores=2, browsers=1) == 2
    assert wasm_threads(cores=16, browsers=3) == MAX_WASM_THREADS == 4
    assert wasm_threads(cores=8, browsers=2) == 4
    assert wasm_threads(cores=2, browsers=3, configured=2) == 2
    assert wasm_threads(cores=0, browsers=0) == 1


def test_the_stages_of_one_shard_share_its_first_stages_browser() -> None:
    """attention/feed-forward: shard 0 holds stages 0 and 2 (attention), shard 1 stages 1 and 3."""
    asked = slots("chromium", "firefox", "firefox", "firefox")
    groups, hosted = host_groups(asked, 4, [(0, 2), (1, 3)])
    assert [(g.shards, g.browser) for g in groups] == [((0, 2), "chromium"), ((1, 3), "firefox")]
    assert hosted[2].browser == "chromium" and "with stage 0 in one shard" in hosted[2].reason
    assert hosted[1] == asked[1] and hosted[3] == asked[3]
    capped, _ = host_groups(asked, 1, [(0, 2), (1, 3)])
    assert [g.shards for g in capped] == [(0, 1, 2, 3)]


def _worker(worker_id: str, browser: str) -> WorkerInfo:
    return WorkerInfo(worker_id, browser, "wasm", "wasm", "", "", "host", 1, 2, 0)


def test_external_workers_take_whole_shards() -> None:
    asked = slots("chromium", "firefox", "chromium", "firefox")
    live = [_worker("f1", "firefox"), _worker("c1", "chromium"), _worker("c2", "chromium")]
    match = match_browsers(asked, live, substitute=False, shards=[(0, 2), (1, 3)])
    assert match is not None
    assert match.workers == {0: ["c1", "c2"], 2: ["c1", "c2"], 1: ["f1"], 3: ["f1"]}
    assert match.slots == asked
    assert match_browsers(asked, live[:1], substitute=False, shards=[(0, 2), (1, 3)]) is None
