"""History, recommendations and the report grouped by the kind of shard (attention, feedforward, vision...),
while history-driven allocation keeps keying on (model, shard type)."""

from __future__ import annotations

import uuid
from pathlib import Path

import duckdb

from broker.codec import pack
from broker.messages import Assignment, ExecutionEvent, decode, encode, to_dict
from coordinator.history.report import print_history
from coordinator.history.store import HistoryStore
from coordinator.planning.allocation import allocate
from coordinator.planning.recommendations import BrowserStat, allocate_from_history, recommend
from coordinator.runtime.metrics import LiveMetrics

MODEL = "tiny-bert"


def stat(browser: str, p50: float, kind: str = "", shard_index: int | None = None) -> BrowserStat:
    return BrowserStat(browser, "wasm", 20, 20, p50, p50 * 1.2, p50, MODEL, "attention_feedforward", shard_index, kind)


def run(shard: int, kind: str, browser: str, kernel_ms: float, ts_ms: float) -> ExecutionEvent:
    return ExecutionEvent(
        event_id=uuid.uuid4().hex,
        ts_ms=ts_ms,
        request_id=f"r{ts_ms}",
        plan_id="plan-af",
        model_name=MODEL,
        shard_index=shard,
        shard_type="attention_feedforward",
        worker_id=f"{browser}-w",
        browser=browser,
        platform="wasm",
        adapter="wasm",
        kernel_ms=kernel_ms,
        queue_ms=0.1,
        transfer_ms=0.2,
        bytes_in=8,
        bytes_out=8,
        attempt=1,
        outcome="success",
        kind=kind,
    )


def workload() -> list[ExecutionEvent]:
    """Attention is fastest on firefox, feed-forward on chromium; each shard ran on both browsers."""
    events = []
    for i in range(10):
        t = 1.7e12 + i * 100.0
        events += [
            run(0, "attention", "firefox", 2.0, t),
            run(0, "attention", "chromium", 6.0, t + 1),
            run(1, "feedforward", "firefox", 9.0, t + 2),
            run(1, "feedforward", "chromium", 3.0, t + 3),
        ]
    return events


def test_the_kind_travels_on_the_assignment_and_the_event_and_old_messages_decode_without_it() -> None:
    a = Assignment("a1", "p", 0, "s", "sha", ("x",), ("y",), "auto", "reply", "m", "attention_feedforward", "attention")
    assert decode(encode(a)) == a
    ev = run(0, "attention", "firefox", 1.0, 1.7e12)
    assert decode(encode(ev)) == ev
    old = {k: v for k, v in to_dict(ev).items() if k != "kind"}  # from a worker of an earlier version
    got = decode(pack(old))
    assert isinstance(got, ExecutionEvent) and got.kind == "" and got.shard_type == "attention_feedforward"


def test_recommendations_have_an_entry_per_kind_and_each_picks_its_own_fastest_browser() -> None:
    stats = [
        stat("firefox", 5.5),
        stat("chromium", 4.5),
        stat("firefox", 2.0, "attention"),
        stat("chromium", 6.0, "attention"),
        stat("firefox", 9.0, "feedforward"),
        stat("chromium", 3.0, "feedforward"),
    ]
    rec = recommend(stats, {}, "text")["browser_allocation"]
    assert {k: v["recommended_browser"] for k, v in rec.items()} == {
        "overall": "chromium",
        "attention_feedforward": "chromium",
        "attention": "firefox",
        "feedforward": "chromium",
    }
    assert rec["attention"]["runs"] == 20 and "firefox/wasm: best measured" in rec["attention"]["reason"]
    assert "the measurements override the guide table" not in rec["attention"]["reason"]  # the guide says firefox
    assert rec["overall"]["runs"] == 20  # chromium's 20 runs: its kind rows are not counted again


def test_history_driven_allocation_ignores_the_kind_rows() -> None:
    slots = allocate(2, model_type="text", model_kind="encoder", installed=lambda b: b != "edge")
    overall = [stat("firefox", 5.5), stat("chromium", 4.5)]
    kinds = [stat("firefox", 1.0, "attention"), stat("chromium", 9.0, "attention")]
    assert allocate_from_history(slots, overall + kinds) == allocate_from_history(slots, overall)
    assert {s.browser for s in allocate_from_history(slots, overall + kinds).values()} == {"chromium"}


def test_duckdb_groups_history_and_report_by_kind(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.duckdb")
    store.write_events(workload())
    kinds = store.browser_stats(MODEL, "attention_feedforward", by_kind=True)
    assert [(s.kind, s.browser, s.runs, s.p50_kernel_ms) for s in kinds] == [
        ("attention", "chromium", 10, 6.0),
        ("attention", "firefox", 10, 2.0),
        ("feedforward", "chromium", 10, 3.0),
        ("feedforward", "firefox", 10, 9.0),
    ]
    assert all(s.shard_index is None for s in kinds)
    assert [s.kind for s in store.browser_stats(MODEL)] == ["", ""]  # the metrics table stays per shard type
    history = store.model_history(MODEL)
    assert sorted(history["shard_types"]) == ["attention", "feedforward"]
    assert history["shard_types"]["attention"]["execution_count"] == 20
    assert history["components"]["shard_1"]["kind"] == "feedforward"
    rec = recommend(store.browser_stats(MODEL) + kinds, {}, "text")["browser_allocation"]
    assert (rec["attention"]["recommended_browser"], rec["feedforward"]["recommended_browser"]) == (
        "firefox",
        "chromium",
    )
    text = print_history(store.db_path)
    per_kind = text.split("per kind of shard")[1].split("per shard")[0]
    assert "attention    attention_feedforward  firefox" in per_kind
    assert "  attention: firefox/wasm: best measured" in text and "  feedforward: chromium/wasm" in text


def test_a_database_from_before_kinds_gains_the_column_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    HistoryStore(path).write_events([run(0, "", "firefox", 2.0, 1.7e12)])
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE model_sharding_components DROP COLUMN kind")  # as an earlier version wrote it
    con.close()
    history = HistoryStore(path).model_history(MODEL)  # a reader migrates it first
    assert history["shard_types"]["attention_feedforward"]["execution_count"] == 1
    HistoryStore(path).write_events([run(0, "attention", "firefox", 2.0, 1.7e12 + 5)])
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT kind FROM model_sharding_components ORDER BY ts").fetchall()
    columns = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'model_sharding_components' "
        "AND column_name = 'kind'"
    ).fetchone()
    con.close()
    assert rows == [("",), ("attention",)] and columns == (1,)


def test_live_counters_group_shard_types_by_kind_as_the_database_does() -> None:
    live = LiveMetrics("attention_feedforward")
    live.stage_kinds = {0: "attention", 1: "feedforward"}
    for shard, ms in ((0, 2.0), (1, 3.0), (0, 4.0)):
        info = {"browser": "firefox", "platform": "wasm", "shard_type": "attention_feedforward", "shard_index": shard}
        live.record_component(f"shard_{shard}", info, True, ms)
    history = live.history()
    assert {k: v["execution_count"] for k, v in history["shard_types"].items()} == {"attention": 2, "feedforward": 1}
    assert history["components"]["shard_1"]["kind"] == "feedforward"
    layer = LiveMetrics("layer")  # shards without a kind keep the shard type
    layer.record_component("shard_0", {"browser": "chromium", "platform": "wasm", "shard_index": 0}, True, 1.0)
    assert list(layer.history()["shard_types"]) == ["layer"]
