"""The history the manager writes is used: faults land in the recovery table, and a second manager on
the same database allocates from what was measured rather than from the guide's static table."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from broker.browsers import find_executable
from coordinator.history.report import print_history, write_html_report
from coordinator.manager import ModelShardingManager
from coordinator.planning.allocation import allocate
from coordinator.settings import ManagerSettings
from tests.conftest import require_browsers
from tests.faults_support import arm, assert_matches_native, broker_of
from tests.onnx_models import residual_mlp, sample_tokens

pytestmark = pytest.mark.browser


def installed(browser: str) -> bool:
    return find_executable(browser) is not None


def rows(db: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def test_a_run_with_a_fault_fills_the_four_tables_with_the_recovery_event(
    tmp_path: Path, cache_dir: Path
) -> None:
    require_browsers("chromium", "firefox")
    model = residual_mlp(tmp_path / "mlp.onnx", layers=4)
    db = tmp_path / "history.duckdb"
    manager = ModelShardingManager(
        str(model),
        num_shards=2,
        browsers=["chromium", "firefox"],
        db_path=str(db),
        settings=ManagerSettings(cache_dir=cache_dir, allow_fault_injection=True),
    )
    assert await manager.initialize_sharding(), manager.last_error
    try:
        for i in range(4):
            inputs = sample_tokens(1, 6 + i, seed=i)
            res = await manager.run_inference_sharded(inputs)
            assert "result" in res, res
            assert_matches_native(model, inputs, res["result"])
        async with broker_of(manager) as broker:  # the page of stage 1 throws in its next kernel
            await arm(broker, manager.fleet.serving[1][0], "kernel-error", 1)
        for i in range(4):  # the one that hits the armed page is retried
            inputs = sample_tokens(1, 6 + i, seed=10 + i)
            res = await manager.run_inference_sharded(inputs)
            assert "result" in res, res
            assert_matches_native(model, inputs, res["result"])
        history = manager.get_performance_history()
        assert [e["failure"] for e in history["recovery_events"]] == ["kernel"]
    finally:
        await manager.close()
    assert rows(db, "select count(*) from model_sharding_history")[0][0] == 8
    # 8 requests x 2 shards succeeded, plus the one kernel that threw
    assert rows(db, "select outcome, count(*) from model_sharding_components group by 1 order by 1") == [
        ("error", 1),
        ("success", 16),
    ]
    recovery = rows(db, "select failure, action, success from model_sharding_recovery_events")
    assert recovery == [("kernel", "retry", True)]
    browsers = {r[0] for r in rows(db, "select browser from model_sharding_browser_metrics")}
    assert browsers == {"chromium", "firefox"}
    # `xshard history` and `xshard report` on that database
    text = print_history(db)
    assert "chromium" in text and "firefox" in text and "kernel" in text
    page = tmp_path / "report.html"
    write_html_report(db, page)
    html = page.read_text()
    assert 'id="latency-over-time"' in html and 'id="recovery-timeline"' in html


async def test_second_manager_allocates_from_measured_history_and_quotes_the_numbers(
    tmp_path: Path, cache_dir: Path
) -> None:
    require_browsers("chromium", "firefox")
    db = tmp_path / "history.duckdb"
    settings = ManagerSettings(cache_dir=cache_dir)
    inputs = {"input_ids": [[101] + [2023 + i for i in range(60)] + [102]]}
    for browser in ("chromium", "firefox"):  # measure every shard on both browsers
        m = ModelShardingManager(
            "all-MiniLM-L6-v2", num_shards=2, browsers=[browser], platform="wasm", db_path=str(db), settings=settings
        )
        assert await m.initialize_sharding(), m.last_error
        try:
            for _ in range(8):
                assert "result" in await m.run_inference_sharded(inputs)
        finally:
            await m.close()
    stats = rows(db, "select browser, platform, p50_kernel_ms from model_sharding_browser_metrics order by 3")
    fastest = stats[0][0]
    static = ModelShardingManager("all-MiniLM-L6-v2", num_shards=2, platform="wasm", settings=settings)
    await static.prepare()  # what a manager without history allocates: the guide's table
    assert static.model is not None
    guide = allocate(2, model_type="text", model_kind=static.model.kind, installed=installed, platform="wasm")
    assert {s.browser for s in guide.values()} == {"chromium"}  # the guide: text embedding -> Edge
    learned = ModelShardingManager(
        "all-MiniLM-L6-v2", num_shards=2, platform="wasm", db_path=str(db), settings=settings
    )
    assert await learned.initialize_sharding(), learned.last_error
    try:
        alloc = learned.get_metrics()["browser_allocation"]
        assert {a["browser"] for a in alloc.values()} == {fastest}
        if fastest != "chromium":
            assert all("ms" in a["reason"] and "%" in a["reason"] for a in alloc.values()), alloc
        recs = learned.get_metrics()["recommendations"]
        assert recs["browser_allocation"]["overall"]["recommended_browser"] == fastest
    finally:
        await learned.close()
