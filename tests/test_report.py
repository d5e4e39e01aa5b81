"""``xshard history``, ``xshard report`` and ``xshard history-writer`` on the database of a real run; the
HTML report opened in real headless Chromium."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from broker.browsers import find_executable
from broker.keys import EVENTS_GROUP
from broker.streams import Broker
from coordinator.cli.commands import Parser, log_level_parent
from coordinator.cli.history import add_history_commands, run_history_command
from tests.test_history import RealRun, event_ids, shared_real_run, workload

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
PLOTS = {
    "latency-over-time": ".point",
    "success-rate": ".bar",
    "latency-by-browser": ".bar",
    "recovery-timeline": ".marker",
}

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
async def real_run(valkey: Any, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RealRun:
    return await shared_real_run(valkey.url, cache_dir, tmp_path_factory)


def xshard(*argv: str) -> int | None:
    """Parse ``argv`` as ``xshard`` does and run the history command it names."""
    parser = Parser(prog="xshard", parents=[log_level_parent(None)])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_history_commands(sub, log_level_parent(argparse.SUPPRESS))
    return run_history_command(parser.parse_args(list(argv)))


def test_xshard_history_prints_the_tables_of_a_real_run(real_run: RealRun, capsys: pytest.CaptureFixture[str]) -> None:
    assert xshard("history", "--db", str(real_run.db), "--model", real_run.model_name) == 0
    out = capsys.readouterr().out
    n = len(real_run.request_ids)
    assert f"requests  {n} ({n} ok, 0 failed, 100.0%)" in out
    per_browser = out.split("per browser and platform")[1].split("per shard")[0]
    for browser in ("chromium", "firefox"):
        line = next(ln for ln in per_browser.splitlines() if f" {browser} " in ln)
        assert line.split()[:5] == ["layer", browser, "wasm", str(n), "100.0%"]
    assert "recent recovery events (2 of 2)" in out
    assert "browser-lost" in out and "reroute" in out and "timeout" in out
    assert f"recent requests ({min(n, 10)} of {n})" in out
    assert real_run.request_ids[-1][:12] in out
    assert "recommendation (from these measurements)" in out and "best measured" in out


def test_history_and_report_refuse_a_missing_database_or_unknown_model(
    real_run: RealRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert xshard("history", "--db", str(tmp_path / "nope.duckdb")) == 2
    assert "no history database at" in capsys.readouterr().err
    assert xshard("report", "--db", str(real_run.db), "--html", str(tmp_path / "r.html"), "--model", "gpt-9") == 2
    err = capsys.readouterr().err
    assert err.startswith("xshard: error:") and "no history for model 'gpt-9'" in err and real_run.model_name in err
    assert not (tmp_path / "nope.duckdb").exists() and not (tmp_path / "r.html").exists()
    assert xshard("report", "--db", str(real_run.db), "--html", str(tmp_path / "missing-dir" / "r.html")) == 2


async def test_xshard_report_renders_its_plots_in_headless_chromium(
    real_run: RealRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.async_api import async_playwright

    html_path = tmp_path / "report.html"
    assert xshard("report", "--db", str(real_run.db), "--html", str(html_path)) == 0
    assert f"wrote {html_path}" in capsys.readouterr().out
    text = html_path.read_text()
    assert "<script" not in text and "https://" not in text and "<link" not in text  # self-contained
    exe = find_executable("chromium")
    assert exe is not None
    args = (["--no-sandbox"] if os.geteuid() == 0 else []) + CHROMIUM_ARGS
    requested: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=exe, args=args)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("request", lambda r: requested.append(r.url))
            await page.goto(html_path.as_uri())
            for plot_id, mark in PLOTS.items():
                svg = page.locator(f"svg.plot#{plot_id}")
                assert await svg.count() == 1, plot_id
                box = await svg.bounding_box()
                assert box is not None and box["width"] > 400 and box["height"] > 100, (plot_id, box)
                assert await page.locator(f"#{plot_id} {mark}").count() > 0, f"{plot_id} has no {mark} marks"
            n = len(real_run.request_ids)
            assert await page.locator("#latency-over-time .point").count() == 2 * n
            series = await page.locator("#success-rate .bar").evaluate_all("bars => bars.map(b => b.dataset.series)")
            assert sorted(series) == ["chromium/wasm", "firefox/wasm"]
            assert await page.locator("#recovery-timeline .request.ok").count() == n
            assert await page.locator("#recovery-timeline .marker").count() == 2
            shot = tmp_path / "report.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            await browser.close()
    assert requested and all(url.startswith("file://") for url in requested), requested


def start_cli(log_path: Path, *argv: str) -> subprocess.Popen[bytes]:
    """``xshard <argv>`` for the history commands, as a process (until cli.py registers them)."""
    code = "import sys; from tests.test_report import xshard; sys.exit(xshard(*sys.argv[1:]))"
    with open(log_path, "wb") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, stdout=out, stderr=out)


async def test_history_writer_command_consumes_until_sigterm(valkey: Any, namespace: str, tmp_path: Path) -> None:
    db, log_path = tmp_path / "h.duckdb", tmp_path / "writer.log"
    events = workload(50)
    async with Broker(valkey.url, namespace) as broker:
        for ev in events[:60]:
            await broker.emit(ev)
        proc = start_cli(
            log_path,
            "history-writer",
            "--redis",
            valkey.url,
            "--namespace",
            namespace,
            "--db",
            str(db),
            "--flush-interval-s",
            "0.1",
        )
        try:
            for ev in events[60:]:
                await broker.emit(ev)
            deadline = time.monotonic() + 60
            while await broker.stream_length(broker.keys.events) or await broker.pending_count(
                broker.keys.events, EVENTS_GROUP
            ):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stopped; wrote 50 requests" in log_path.read_text()
    assert sorted(event_ids(db)) == sorted(ev.event_id for ev in events)
