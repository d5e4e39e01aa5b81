"""The hosting policy, pure: consecutive shards share a browser under a cap, and threads are shared out."""

from __future__ import annotations

from coordinator.planning.allocation import Slot
from coordinator.planning.hosting import MAX_WASM_THREADS, host_groups, wasm_threads


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
