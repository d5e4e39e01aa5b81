"""Performance history: the DuckDB store, the history consumer on a real valkey (including killing it),
a real run across Chromium and Firefox, and the pure recommendations and history-driven allocation."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import redis.asyncio as aioredis

from broker.keys import EVENTS_GROUP
from broker.messages import Event, ExecutionEvent, RecoveryEvent, Release, RequestEvent
from broker.streams import Broker
from coordinator.history.store import HistoryStore, merge_history
from coordinator.history.writer import HistoryWriter
from coordinator.planning.allocation import allocate
from coordinator.planning.recommendations import BrowserStat, allocate_from_history, recommend
from tests.conftest import require_browsers
from tests.onnx_models import residual_mlp, sample_tokens

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-mlp"


# -- events as workers and coordinators append them --------------------------------------------------


def execution(
    request_id: str, shard: int, browser: str, kernel_ms: float, ts_ms: float, ok: bool = True, model: str = MODEL
) -> ExecutionEvent:
    return ExecutionEvent(
        event_id=uuid.uuid4().hex,
        ts_ms=ts_ms,
        request_id=request_id,
        plan_id="plan-a",
        model_name=model,
        shard_index=shard,
        shard_type="layer",
        worker_id=f"{browser}-w{shard}",
        browser=browser,
        platform="wasm",
        adapter="wasm (simd)",
        kernel_ms=kernel_ms if ok else 0.0,
        queue_ms=0.5,
        transfer_ms=1.5,
        bytes_in=64,
        bytes_out=64,
        attempt=1,
        outcome="success" if ok else "error",
        error="" if ok else "kernel failed",
    )


def request(request_id: str, ts_ms: float, ok: bool = True, model: str = MODEL) -> RequestEvent:
    return RequestEvent(
        event_id=uuid.uuid4().hex,
        ts_ms=ts_ms,
        request_id=request_id,
        plan_id="plan-a",
        model_name=model,
        shard_type="layer",
        num_shards=2,
        coordinator_id="coord-test",
        latency_ms=12.5,
        kernel_ms=4.0,
        attempts=1 if ok else 2,
        outcome="success" if ok else "error",
        error="" if ok else "shard 1 failed",
    )


def recovery(
    request_id: str,
    ts_ms: float,
    failure: str = "browser-lost",
    action: str = "reroute",
    ok: bool = True,
    model: str = MODEL,
    plan_id: str = "plan-a",
    browser: str = "firefox",
) -> RecoveryEvent:
    return RecoveryEvent(
        event_id=uuid.uuid4().hex,
        ts_ms=ts_ms,
        request_id=request_id,
        plan_id=plan_id,
        model_name=model,
        shard_index=1,
        worker_id=f"{browser}-w1",
        browser=browser,
        platform="wasm",
        failure=failure,
        action=action,
        success=ok,
        duration_ms=250.0,
        error="" if ok else "worker lost",
    )


def workload(requests: int, t0_ms: float | None = None) -> list[Event]:
    """Per request two shard executions (chromium ~2 ms, firefox ~1 ms), its request event; every
    fifth request a failed firefox execution and a recovery event."""
    t0 = time.time() * 1000.0 if t0_ms is None else t0_ms
    events: list[Event] = []
    for i in range(requests):
        rid, ts = uuid.uuid4().hex, t0 + i * 10.0
        events.append(execution(rid, 0, "chromium", 2.0 + (i % 4) * 0.1, ts))
        if i % 5 == 4:
            events.append(execution(rid, 1, "firefox", 0.0, ts + 1, ok=False))
            events.append(recovery(rid, ts + 2))
        events.append(execution(rid, 1, "firefox", 1.0 + (i % 3) * 0.1, ts + 3))
        events.append(request(rid, ts + 4))
    return events


def table_counts(db: Path) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = (
            "model_sharding_history",
            "model_sharding_components",
            "model_sharding_recovery_events",
            "model_sharding_browser_metrics",
        )
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}  # type: ignore[index]
    finally:
        con.close()


def event_ids(db: Path) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("""SELECT event_id FROM model_sharding_history UNION ALL
                              SELECT event_id FROM model_sharding_components UNION ALL
                              SELECT event_id FROM model_sharding_recovery_events""").fetchall()
        return [r[0] for r in rows]
    finally:
        con.close()


# -- the store ---------------------------------------------------------------------------------------


def test_a_batch_written_twice_is_stored_once_in_the_four_tables(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.duckdb")
    events = workload(10)
    first = store.write_events(events)
    assert (first.requests, first.executions, first.recoveries, first.duplicates) == (10, 22, 2, 0)
    again = store.write_events([*events, *events[:5]])  # redelivered, and duplicated inside one batch
    assert again.written == 0 and again.duplicates == len(events) + 5
    counts = table_counts(store.db_path)
    assert counts == {
        "model_sharding_history": 10,
        "model_sharding_components": 22,
        "model_sharding_recovery_events": 2,
        "model_sharding_browser_metrics": 2,
    }
    assert sorted(event_ids(store.db_path)) == sorted(ev.event_id for ev in events)


def test_browser_metrics_aggregate_the_component_rows(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.duckdb")
    events = workload(20)
    store.write_events(events[:30])
    store.write_events(events[30:])  # metrics are recomputed over both batches
    stats = {s.browser: s for s in store.browser_stats(MODEL)}
    for browser in ("chromium", "firefox"):
        mine = [ev for ev in events if isinstance(ev, ExecutionEvent) and ev.browser == browser]
        ok = np.array([ev.kernel_ms for ev in mine if ev.outcome == "success"])
        s = stats[browser]
        assert (s.runs, s.successes, s.platform, s.shard_type) == (len(mine), len(ok), "wasm", "layer")
        assert s.p50_kernel_ms == pytest.approx(np.percentile(ok, 50))
        assert s.p95_kernel_ms == pytest.approx(np.percentile(ok, 95))
        assert s.avg_kernel_ms == pytest.approx(ok.mean())
    assert stats["firefox"].success_rate == pytest.approx(20 / 24)
    con = duckdb.connect(str(store.db_path), read_only=True)
    row = con.execute("""SELECT execution_count, success_count, error_count, success_rate, updated_at IS NOT NULL
                         FROM model_sharding_browser_metrics WHERE browser = 'firefox'""").fetchone()
    con.close()
    assert row == (24, 20, 4, pytest.approx(20 / 24), True)
    by_shard = store.browser_stats(MODEL, "layer", by_shard=True, plan_id="plan-a")
    assert [(s.shard_index, s.browser, s.runs) for s in by_shard] == [(0, "chromium", 20), (1, "firefox", 24)]


def test_model_history_has_the_guides_structure_and_merges_with_live_counters(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.duckdb")
    assert store.model_history(MODEL)["components"] == {}
    assert not store.db_path.exists()  # readers never create the file
    store.write_events(workload(10))
    h = store.model_history(MODEL)
    assert {"components", "browser_metrics", "overall_metrics", "shard_types", "timeline", "recovery_events"} <= set(h)
    assert h["components"]["shard_1"]["browser"] == "firefox"
    assert h["components"]["shard_1"]["error_count"] == 2
    assert h["browser_metrics"]["chromium"]["execution_count"] == 10
    assert h["overall_metrics"]["success_count"] == 10 and len(h["timeline"]) == 10
    assert [e["action"] for e in h["recovery_events"]] == ["reroute", "reroute"]
    live = {
        "browser_metrics": {
            "chromium": {
                "success_count": 3,
                "error_count": 1,
                "total_latency": 6.0,
                "execution_count": 4,
                "p50_latency": 2.0,
                "p95_latency": 2.0,
            }
        },
        "overall_metrics": {"success_count": 3, "error_count": 0, "total_latency": 30.0, "execution_count": 3},
        "timeline": [{"request_id": "live"}],
    }
    merged = merge_history(h, live)
    assert merged["browser_metrics"]["chromium"]["execution_count"] == 14
    assert merged["browser_metrics"]["chromium"]["success_rate"] == pytest.approx(13 / 14)
    assert merged["overall_metrics"]["execution_count"] == 13
    assert merged["timeline"][-1] == {"request_id": "live"} and len(merged["timeline"]) == 11


# -- the consumer on a real valkey ---------------------------------------------------------------------


async def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_writer_writes_emitted_events_once_and_drops_what_it_cannot_decode(
    valkey: Any, namespace: str, tmp_path: Path
) -> None:
    db = tmp_path / "h.duckdb"
    events = workload(15)
    async with Broker(valkey.url, namespace) as broker:
        for ev in events[:20]:
            await broker.emit(ev)  # before the writer exists: the group starts at 0 and sees them
        raw = aioredis.Redis.from_url(valkey.url)
        await raw.xadd(broker.keys.events, {b"m": b"\xc1 not msgpack"})
        await raw.aclose()
        await broker.add(broker.keys.events, Release("not-an-event"))
        await broker.emit(dataclasses.replace(execution("r", 0, "chromium", 1.0, 0.0), shard_index="zero"))  # type: ignore[arg-type]
        async with HistoryWriter(broker, db, batch_size=8, flush_interval_s=0.05) as writer:
            for ev in events[20:]:
                await broker.emit(ev)
            await wait_for(lambda: _empty(broker), 20, "the writer to drain the stream")
        assert writer.dropped == 3
        assert writer.totals.written == len(events) and writer.totals.duplicates == 0
        assert await broker.stream_length(broker.keys.events) == 0
        assert await broker.pending_count(broker.keys.events, EVENTS_GROUP) == 0
    assert sorted(event_ids(db)) == sorted(ev.event_id for ev in events)


async def _empty(broker: Broker) -> bool:
    return await broker.stream_length(broker.keys.events) == 0


async def test_events_written_but_not_acked_before_a_crash_are_written_once_after_restart(
    valkey: Any, namespace: str, tmp_path: Path
) -> None:
    db = tmp_path / "h.duckdb"
    events = workload(10)
    async with Broker(valkey.url, namespace) as broker:
        await broker.ensure_group(broker.keys.events, EVENTS_GROUP)
        for ev in events:
            await broker.emit(ev)
        # a writer that read a batch and committed it, then died before acking it
        got = await broker.read_group(EVENTS_GROUP, "writer", [broker.keys.events], count=20, block_ms=100)
        assert len(got) == 20
        HistoryStore(db).write_events([d.message for d in got])  # type: ignore[misc]
        assert await broker.pending_count(broker.keys.events, EVENTS_GROUP) == 20
        async with HistoryWriter(broker, db, batch_size=16, flush_interval_s=0.05) as writer:
            await writer.flush()
            assert writer.totals.duplicates == 20 and writer.totals.written == len(events) - 20
        assert await broker.pending_count(broker.keys.events, EVENTS_GROUP) == 0
        assert await broker.stream_length(broker.keys.events) == 0
    ids = event_ids(db)
    assert len(ids) == len(set(ids)) and set(ids) == {ev.event_id for ev in events}


def start_writer_process(url: str, namespace: str, db: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "history-writer",
                "--redis",
                url,
                "--namespace",
                namespace,
                "--db",
                str(db),
                "--batch-size",
                "64",
                "--flush-interval-s",
                "0.2",
                "--log-level",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def test_killed_history_consumer_restarted_loses_no_event_and_writes_none_twice(
    valkey: Any, namespace: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    db, log_path = tmp_path / "h.duckdb", tmp_path / "writer.log"
    events = workload(700)  # 2240 events
    async with Broker(valkey.url, namespace) as broker:
        stream = broker.keys.events
        emitted = 0

        async def produce() -> None:
            nonlocal emitted
            for k in range(0, len(events), 40):
                for ev in events[k : k + 40]:
                    await broker.emit(ev)
                    emitted += 1
                await asyncio.sleep(0.02)

        first = start_writer_process(valkey.url, namespace, db, log_path)
        processes.append(first)
        producer = asyncio.get_running_loop().create_task(produce())

        async def written_some() -> bool:  # acked entries are deleted: emitted - length were written
            return emitted - await broker.stream_length(stream) >= 300

        await wait_for(written_some, 60, "the first writer to write 300 events")
        first.send_signal(signal.SIGKILL)
        first.wait()
        pending_at_kill = await broker.pending_count(stream, EVENTS_GROUP)
        await producer
        assert emitted == len(events)

        second = start_writer_process(valkey.url, namespace, db, log_path)
        processes.append(second)

        async def drained() -> bool:
            return await broker.stream_length(stream) == 0 and await broker.pending_count(stream, EVENTS_GROUP) == 0

        await wait_for(drained, 120, "the restarted writer to drain the stream")
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0, log_path.read_text()
    ids = event_ids(db)
    assert len(ids) == len(set(ids)), "an event was written twice"
    missing = {ev.event_id for ev in events} - set(ids)
    assert not missing, f"{len(missing)} events lost (pending at kill: {pending_at_kill})"
    assert table_counts(db)["model_sharding_history"] == 700


# -- a real run --------------------------------------------------------------------------------------


@dataclass
class RealRun:
    db: Path
    model_name: str
    plan_id: str
    request_ids: list[str]
    recovery_ids: list[str]


async def record_real_run(valkey_url: str, cache_dir: Path, tmp: Path, requests: int = 8) -> RealRun:
    """A ModelShardingManager over a Chromium and a Firefox worker (separate processes, registered in
    valkey) runs ``requests`` requests while a HistoryWriter consumes the events; two recovery events for
    real requests are appended as the fault-tolerance ladder appends them."""
    from coordinator.manager import ModelShardingManager
    from coordinator.runtime.launcher import LocalWorkers
    from coordinator.settings import ManagerSettings

    require_browsers("chromium", "firefox")
    namespace = f"t{uuid.uuid4().hex[:10]}"
    db = tmp / "history.duckdb"
    workers = LocalWorkers(valkey_url, namespace, cache_dir, 0.5)
    ids = [workers.spawn(b, "wasm").worker_id for b in ("chromium", "firefox")]
    model = residual_mlp(tmp / "mlp.onnx", layers=4)
    try:
        async with Broker(valkey_url, namespace) as broker:
            await workers.wait_registered(broker, ids, timeout_s=60, max_age_ms=2000)
            writer = HistoryWriter(broker, db, batch_size=16, flush_interval_s=0.1)
            await writer.start()
            manager = ModelShardingManager(
                str(model),
                num_shards=2,
                browsers=["chromium", "firefox"],
                platform="wasm",
                redis_url=valkey_url,
                settings=ManagerSettings(
                    cache_dir=cache_dir, namespace=namespace, assign_timeout_s=120, request_timeout_s=60
                ),
            )
            try:
                assert await manager.initialize_sharding(), manager.last_error
                inputs = sample_tokens(2, 5)
                results = [await manager.run_inference_sharded(inputs) for _ in range(requests // 2)]
                results += await asyncio.gather(
                    *(manager.run_inference_sharded(inputs) for _ in range(requests - requests // 2))
                )
                assert all("error" not in r for r in results), [r.get("error") for r in results]
                request_ids = [r["metrics"]["request_id"] for r in results]
                assert manager.shards is not None
                plan_id = manager.shards.plan.plan_id
                recoveries = [
                    recovery(
                        request_ids[1], time.time() * 1000.0 - 50, "browser-lost", "reroute", True, str(model), plan_id
                    ),
                    recovery(
                        request_ids[-1],
                        time.time() * 1000.0,
                        "timeout",
                        "retry",
                        False,
                        str(model),
                        plan_id,
                        "chromium",
                    ),
                ]
                for ev in recoveries:
                    await broker.emit(ev)
            finally:
                await manager.close()  # its request events are appended before it returns
            await writer.close()  # flushes
    finally:
        await workers.stop_all()
    return RealRun(db, str(model), plan_id, request_ids, [ev.event_id for ev in recoveries])


_real_runs: dict[str, RealRun] = {}


async def shared_real_run(valkey_url: str, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    """One real run per test session, shared by the tests that only read its database."""
    if valkey_url not in _real_runs:
        _real_runs[valkey_url] = await record_real_run(valkey_url, cache_dir, tmp_path_factory.mktemp("real-run"))
    return _real_runs[valkey_url]


@pytest.fixture(scope="module")
async def real_run(valkey: Any, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    return await shared_real_run(valkey.url, cache_dir, tmp_path_factory)


@pytest.mark.browser
def test_a_real_run_across_chromium_and_firefox_fills_the_four_tables(real_run: RealRun) -> None:
    con = duckdb.connect(str(real_run.db), read_only=True)
    try:
        history = con.execute(
            "SELECT request_id, outcome, num_shards, plan_id FROM model_sharding_history WHERE model_name = ?",
            [real_run.model_name],
        ).fetchall()
        assert sorted(r[0] for r in history) == sorted(real_run.request_ids)
        assert {(r[1], r[2], r[3]) for r in history} == {("success", 2, real_run.plan_id)}
        comps = con.execute(
            """SELECT request_id, shard_index, browser, platform, kernel_ms, outcome
                               FROM model_sharding_components WHERE model_name = ?""",
            [real_run.model_name],
        ).fetchall()
        assert len(comps) == 2 * len(real_run.request_ids)
        assert {(r[0], r[1]) for r in comps} == {(rid, i) for rid in real_run.request_ids for i in (0, 1)}
        assert {(r[1], r[2], r[3]) for r in comps} == {(0, "chromium", "wasm"), (1, "firefox", "wasm")}
        assert all(r[4] > 0 and r[5] == "success" for r in comps)
        rec = con.execute("SELECT event_id FROM model_sharding_recovery_events").fetchall()
        assert sorted(r[0] for r in rec) == sorted(real_run.recovery_ids)
        metrics = con.execute(
            "SELECT browser, execution_count, success_rate FROM model_sharding_browser_metrics WHERE model_name = ? "
            "ORDER BY browser",
            [real_run.model_name],
        ).fetchall()
        n = len(real_run.request_ids)
        assert metrics == [("chromium", n, 1.0), ("firefox", n, 1.0)]
    finally:
        con.close()
    stats = HistoryStore(real_run.db).browser_stats(real_run.model_name)
    assert {s.label for s in stats} == {"chromium/wasm", "firefox/wasm"}
    assert recommend(stats, {}, "text")["browser_allocation"]["overall"]["recommended_browser"] in {
        "chromium",
        "firefox",
    }


# -- recommendations and allocation from history (pure) ------------------------------------------------


def stat(
    browser: str,
    p50: float,
    runs: int = 40,
    ok: int | None = None,
    platform: str = "wasm",
    shard_index: int | None = None,
) -> BrowserStat:
    return BrowserStat(
        browser, platform, runs, runs if ok is None else ok, p50, p50 * 1.3, p50 * 1.05, MODEL, "layer", shard_index
    )


def text_slots(n: int = 2) -> dict[int, Any]:
    return allocate(n, model_type="text", model_kind="encoder", installed=lambda b: b != "edge")


def test_no_history_gives_no_recommendations_and_keeps_the_allocation() -> None:
    slots = text_slots()
    assert recommend([], {}, "text") == {}
    assert recommend([stat("firefox", 10.0, runs=0)], {}, "text") == {}
    assert allocate_from_history(slots, []) == slots


def test_measurements_that_contradict_the_guide_table_win_and_the_reason_quotes_them() -> None:
    slots = text_slots()
    assert {s.browser for s in slots.values()} == {"chromium"} and "guide table" in slots[0].reason
    stats = [stat("chromium", 88.0), stat("firefox", 41.2)]
    chosen = allocate_from_history(slots, stats)
    for i in (0, 1):
        assert (chosen[i].browser, chosen[i].platform) == ("firefox", "wasm")
        assert (
            "firefox/wasm: measured fastest: 100.0% success over 40 runs, p50 41.2 ms kernel vs chromium/wasm "
            "88.0 ms" in chosen[i].reason
        )
        assert "the data overrides the earlier choice (guide table: text embedding -> edge" in chosen[i].reason
    rec = recommend(stats, {i: s.as_dict() for i, s in slots.items()}, "text")
    overall = rec["browser_allocation"]["overall"]
    assert (overall["recommended_browser"], overall["recommended_platform"]) == ("firefox", "wasm")
    assert overall["reason"].startswith(
        "firefox/wasm: best measured: 100.0% success over 40 runs, p50 41.2 ms kernel vs chromium/wasm 88.0 ms"
    )
    assert "the measurements override the guide table (text embedding -> edge" in overall["reason"]
    assert rec["browser_allocation"]["layer"]["recommended_browser"] == "firefox"
    kinds = {s["type"]: s for s in rec["optimization_suggestions"]}
    assert kinds["allocation"]["issue"] == "Only 0/2 shards using the best measured browser (firefox/wasm)"
    assert "chromium/wasm 88.0 ms" in kinds["allocation"]["suggestion"]
    assert "guide_table" in kinds


def test_measurements_that_agree_with_the_table_do_not_claim_to_override_it() -> None:
    rec = recommend([stat("chromium", 20.0), stat("firefox", 41.2)], {}, "text")
    assert rec["browser_allocation"]["overall"]["recommended_browser"] == "chromium"
    assert "override" not in rec["browser_allocation"]["overall"]["reason"]
    assert all(s["type"] != "guide_table" for s in rec["optimization_suggestions"])


def test_custom_unreliable_thin_or_uninstalled_choices_are_not_followed() -> None:
    slots = allocate(
        3,
        model_type="text",
        model_kind="encoder",
        installed=lambda b: True,
        custom={2: {"browser": "chromium", "platform": "wasm"}},
    )
    stats = [stat("chromium", 88.0), stat("firefox", 10.0, ok=30), stat("edge", 5.0, runs=3), stat("webkit", 1.0)]
    chosen = allocate_from_history(slots, stats, installed=lambda b: b != "webkit")
    assert chosen[0].browser == chosen[1].browser == "chromium"  # firefox 75% < 90%, edge 3 runs < 5
    assert "measured fastest" in chosen[0].reason and "firefox/wasm 10.0 ms (75.0% success)" in chosen[0].reason
    assert chosen[2] == slots[2]  # custom_browser_allocation is the user's word
    assert allocate_from_history(slots, stats, fixed={0, 1}, installed=lambda b: b != "webkit") == slots
    webgpu = allocate_from_history(slots, [*stats, stat("firefox", 30.0, platform="webgpu")], platform="webgpu")
    assert (webgpu[0].browser, webgpu[0].platform) == ("firefox", "webgpu")
    rec = recommend(stats, {}, "text")
    kinds = [s["type"] for s in rec["optimization_suggestions"]]
    assert "reliability" in kinds and "measurement" in kinds


def test_same_shard_measurements_are_preferred_when_two_browsers_ran_that_shard() -> None:
    slots = text_slots()
    stats = [
        stat("chromium", 50.0),
        stat("firefox", 20.0),  # over all shards: firefox
        stat("chromium", 5.0, shard_index=0),
        stat("firefox", 9.0, shard_index=0),  # shard 0: chromium
        stat("firefox", 30.0, shard_index=1),
    ]
    chosen = allocate_from_history(slots, stats)
    assert chosen[0].browser == "chromium" and chosen[0].reason.startswith("history on shard 0:")
    assert chosen[1].browser == "firefox" and chosen[1].reason.startswith("history over all shards:")


def test_an_unmeasured_guide_choice_is_replaced_without_claiming_the_data_contradicts_it() -> None:
    slots = text_slots()
    chosen = allocate_from_history(slots, [stat("firefox", 41.2)])
    assert chosen[0].browser == "firefox"
    assert "firefox/wasm: only measured choice: 100.0% success over 40 runs, p50 41.2 ms kernel" in chosen[0].reason
    assert "replaces, as it has no measurements here, the earlier choice (guide table" in chosen[0].reason
    rec = recommend([stat("firefox", 41.2)], {}, "text")
    assert "the guide table's choice has no measurements here" in rec["browser_allocation"]["overall"]["reason"]
    assert all(s["type"] != "guide_table" for s in rec["optimization_suggestions"])


def test_a_shard_stays_on_its_browser_when_the_fastest_is_not_clearly_faster() -> None:
    slots = text_slots()  # chromium, from the guide table
    near = allocate_from_history(slots, [stat("chromium", 0.52), stat("firefox", 0.49)])
    assert near[0].browser == "chromium"
    assert near[0].reason == (
        "history over all shards: chromium/wasm: within 10% of the fastest, kept: 100.0% success "
        "over 40 runs, p50 0.52 ms kernel vs firefox/wasm 0.49 ms"
    )
    clear = allocate_from_history(slots, [stat("chromium", 0.52), stat("firefox", 0.40)])
    assert clear[0].browser == "firefox" and "p50 0.40 ms kernel vs chromium/wasm 0.52 ms" in clear[0].reason
