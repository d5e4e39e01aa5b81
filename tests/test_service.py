"""The front door with real components: ``xshard coordinator`` processes (arq workers) running jobs on
three ``xshard worker`` processes with real browsers, jobs enqueued from the command line and from
Python, outputs against native onnxruntime on the whole model, the status page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from arq.jobs import Job, JobStatus
from prometheus_client.parser import text_string_to_metric_families

from broker.embedded import EmbeddedValkey, free_port
from broker.ledger import Ledger
from broker.streams import Broker
from coordinator.service import DeadLettered, enqueue_inference
from coordinator.service.queue import finished_jobs, open_queue
from coordinator.service.serializer import job_deserializer
from tests.conftest import require_browsers
from tests.faults_support import arm, assert_matches_native, start_xshard_worker, stop_processes, wait_until
from tests.onnx_models import residual_mlp, sample_tokens
from tests.service_support import CoordinatorProcess, coordinator_argv, requests_of, xshard

pytestmark = pytest.mark.browser

BROWSERS = ("chromium", "firefox", "chromium")
RESULT_TIMEOUT_S = 180.0
CHROMIUM_ARGS = ["--disable-background-networking", "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # big enough that jobs are in flight when a coordinator is killed
    return residual_mlp(tmp_path_factory.mktemp("service") / "mlp.onnx", layers=8, hidden=256, vocab=50)


@pytest.fixture(scope="module")
def fleet_ns() -> str:
    return f"svc{os.getpid()}{int(time.time()) % 100000}"


@pytest.fixture(scope="module")
async def workers(valkey: EmbeddedValkey, fleet_ns: str, cache_dir: Path) -> AsyncIterator[list[str]]:
    """Three ``xshard worker`` processes registered in the module's namespace."""
    require_browsers("chromium", "firefox")
    ids = [f"{b}-{fleet_ns}-{i}" for i, b in enumerate(BROWSERS)]
    procs = [start_xshard_worker(valkey.url, b, fleet_ns, cache_dir, wid) for b, wid in zip(BROWSERS, ids, strict=True)]
    try:
        async with Broker(valkey.url, fleet_ns) as broker:

            async def all_live() -> bool:
                live = await broker.live_workers(int(time.time() * 1000), 2000)
                return {w.worker_id for w in live} >= set(ids)

            await wait_until(all_live, 90, "three workers registered")
        yield ids
    finally:
        stop_processes(procs)


@pytest.fixture
async def broker(valkey: EmbeddedValkey, fleet_ns: str) -> AsyncIterator[Broker]:
    async with Broker(valkey.url, fleet_ns) as b:
        yield b


def write_inputs(path: Path, inputs: dict[str, np.ndarray]) -> Path:
    np.savez(path, **inputs)  # type: ignore[arg-type]
    return path


async def enqueue_cli(valkey: EmbeddedValkey, ns: str, model: Path, inputs_path: Path, cache: Path) -> str:
    args = ["enqueue", "--redis", valkey.url, "--namespace", ns, "--model", str(model), "--shards", "2"]
    code, out, err = await xshard(*args, "--inputs", str(inputs_path), cache_dir=cache)
    assert code == 0, err
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="class")
async def served(
    valkey: EmbeddedValkey,
    fleet_ns: str,
    workers: list[str],
    model: Path,
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("served")
    port = free_port()
    extra = ["--http", f"127.0.0.1:{port}", "--db", str(tmp / "history.duckdb"), "--max-jobs", "4"]
    coord = await CoordinatorProcess(
        coordinator_argv(valkey.url, fleet_ns, cache_dir, *extra), cache_dir, tmp / "coordinator.log"
    ).start()
    inputs = [sample_tokens(1, 5 + i, seed=i) for i in range(4)]
    try:
        cli_job = await enqueue_cli(valkey, fleet_ns, model, write_inputs(tmp / "in.npz", inputs[0]), cache_dir)
        py_jobs: list[Job] = []
        for arrays in inputs[1:]:
            job = await enqueue_inference(
                valkey.url, model=str(model), inputs=arrays, shards=2, namespace=fleet_ns, cache_dir=cache_dir
            )
            py_jobs.append(job)
        yield {"coord": coord, "port": port, "tmp": tmp, "inputs": inputs, "cli_job": cli_job, "py_jobs": py_jobs}
    finally:
        code = await coord.stop()
        assert code == 0, coord.tail()


class TestJobsThroughACoordinator:
    """One coordinator (``--http``, ``--db``) serves jobs enqueued from the CLI and from Python."""

    async def test_a_job_enqueued_from_the_cli_is_fetched_by_id_and_matches_native(
        self, served: dict[str, Any], valkey: EmbeddedValkey, fleet_ns: str, model: Path, cache_dir: Path
    ) -> None:
        out = served["tmp"] / "out.npz"
        args = ["result", served["cli_job"], "--redis", valkey.url, "--namespace", fleet_ns, "--output", str(out)]
        code, stdout, err = await xshard(*args, "--wait", "--timeout-s", str(RESULT_TIMEOUT_S), cache_dir=cache_dir)
        assert code == 0, (stdout, err, served["coord"].tail())
        with np.load(out) as got:
            assert_matches_native(model, served["inputs"][0], {n: got[n] for n in got.files})

    async def test_jobs_enqueued_from_python_return_through_arqs_job_result(
        self, served: dict[str, Any], model: Path
    ) -> None:
        for job, inputs in zip(served["py_jobs"], served["inputs"][1:], strict=True):
            res = await job.result(timeout=RESULT_TIMEOUT_S)
            assert set(res) == {"result", "metrics"} and res["metrics"]["successful_components"] == 2
            assert_matches_native(model, inputs, res["result"])

    async def test_xshard_jobs_lists_them_complete(
        self, served: dict[str, Any], valkey: EmbeddedValkey, fleet_ns: str, cache_dir: Path
    ) -> None:
        ids = {served["cli_job"], *(j.job_id for j in served["py_jobs"])}
        for job in served["py_jobs"]:
            await job.result(timeout=RESULT_TIMEOUT_S)
        args = ["jobs", "--redis", valkey.url, "--namespace", fleet_ns, "--json"]
        code, out, err = await xshard(*args, cache_dir=cache_dir)
        assert code == 0, err
        rows = {r["job_id"]: r for r in json.loads(out)}
        assert ids <= set(rows)
        assert all(rows[i]["status"] == "complete" for i in ids), rows

    async def test_no_job_payload_in_redis_is_a_pickle(self, served: dict[str, Any], valkey: EmbeddedValkey) -> None:
        for job in served["py_jobs"]:
            await job.result(timeout=RESULT_TIMEOUT_S)
        redis = await open_queue(valkey.url, "default")
        payloads = 0
        try:
            async for key in redis.scan_iter(match="arq:*"):
                if await redis.type(key) != b"string":
                    continue
                raw = await redis.get(key)
                if raw is None or key.startswith((b"arq:retry:", b"arq:in-progress:")) or b"health-check" in key:
                    continue
                with pytest.raises(pickle.UnpicklingError):
                    pickle.loads(raw)
                assert isinstance(job_deserializer(raw), dict), key
                payloads += 1
        finally:
            await redis.aclose()
        assert payloads >= len(served["py_jobs"]) + 1  # at least every result of this class

    async def test_xshard_status_json_lists_the_live_workers_and_stages(
        self, served: dict[str, Any], valkey: EmbeddedValkey, fleet_ns: str, workers: list[str], cache_dir: Path
    ) -> None:
        for job in served["py_jobs"]:
            await job.result(timeout=RESULT_TIMEOUT_S)
        code, out, err = await xshard(
            "status", "--redis", valkey.url, "--namespace", fleet_ns, "--json", cache_dir=cache_dir
        )
        assert code == 0, err
        status = json.loads(out)
        assert {w["worker_id"] for w in status["workers"]} >= set(workers)
        assert all(w["heartbeat_age_ms"] < 2000 and w["state"] == "ready" for w in status["workers"])
        served_stages = [st for st in status["stages"] if st["consumers"] > 0]
        assert sorted(st["index"] for st in served_stages) == [0, 1], status["stages"]
        assert served["coord"].service_id in {c["service_id"] for c in status["coordinators"]}

    async def test_metrics_parse_as_prometheus_text(self, served: dict[str, Any]) -> None:
        for job in served["py_jobs"]:
            await job.result(timeout=RESULT_TIMEOUT_S)
        url = f"http://127.0.0.1:{served['port']}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        samples = {}
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        assert samples[("xshard_requests_total", (("outcome", "success"),))] >= 4
        assert samples[("xshard_request_latency_seconds_count", ())] >= 4
        stages = {dict(k[1]).get("stage") for k in samples if k[0] == "xshard_stage_latency_seconds_count"}
        assert stages == {"0", "1"}

    async def test_the_status_page_renders_the_fleet_in_headless_chromium(
        self, served: dict[str, Any], workers: list[str]
    ) -> None:
        from playwright.async_api import async_playwright

        from broker.browsers import find_executable

        exe = find_executable("chromium")
        assert exe is not None
        args = (["--no-sandbox"] if os.geteuid() == 0 else []) + CHROMIUM_ARGS
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=exe, args=args)
            try:
                page = await browser.new_page(viewport={"width": 1200, "height": 1400})
                await page.goto(f"http://127.0.0.1:{served['port']}/")
                await page.wait_for_selector(f"#workers td:text-is('{workers[0]}')", timeout=20_000)
                shown = await page.locator("#workers tr td:first-child").all_inner_texts()
                assert set(workers) <= set(shown)
                summary = await page.locator("#summary").inner_text()
                assert "live workers: 3" in summary and "coordinators: 1" in summary, summary
                stages = await page.locator("#stages tr td:last-child").all_inner_texts()
                assert len(stages) == 2 and all(int(c) >= 1 for c in stages), stages
                await page.locator("iframe").wait_for(timeout=10_000)
                await page.screenshot(path=str(served["tmp"] / "status.png"), full_page=True)
            finally:
                await browser.close()


async def test_a_dead_lettered_job_fails_with_its_reason_and_replay_makes_its_result_available(
    valkey: EmbeddedValkey,
    fleet_ns: str,
    workers: list[str],
    model: Path,
    cache_dir: Path,
    tmp_path: Path,
    broker: Broker,
) -> None:
    coord = await CoordinatorProcess(
        coordinator_argv(valkey.url, fleet_ns, cache_dir), cache_dir, tmp_path / "coordinator.log"
    ).start()
    try:
        for wid in workers:  # every page throws: the request can only end in the dead letter
            await arm(broker, wid, "kernel-error", 1000)
        inputs = sample_tokens(1, 6, seed=99)
        job = await enqueue_inference(
            valkey.url,
            model=str(model),
            inputs=inputs,
            shards=2,
            max_retries=0,
            namespace=fleet_ns,
            cache_dir=cache_dir,
        )
        with pytest.raises(DeadLettered, match="injected kernel error") as failed:
            await job.result(timeout=RESULT_TIMEOUT_S)
        request_id = failed.value.request_id
        out = tmp_path / "out.npz"
        fetch = ["result", job.job_id, "--redis", valkey.url, "--namespace", fleet_ns, "--output", str(out)]
        code, _, err = await xshard(*fetch, cache_dir=cache_dir)
        assert code == 1 and "dead-lettered" in err and "injected kernel error" in err, err
        letters = [eid for eid, d, _ in await Ledger(broker).dead_letters() if d and d.request_id == request_id]
        assert len(letters) == 1
        for wid in workers:
            await arm(broker, wid, "kernel-error", 0)
        code, stdout, err = await xshard(
            "replay", letters[0], "--redis", valkey.url, "--namespace", fleet_ns, cache_dir=cache_dir
        )
        assert code == 0, (stdout, err)
        code, stdout, err = await xshard(*fetch, cache_dir=cache_dir)
        assert code == 0, (stdout, err)
        assert request_id in stdout
        with np.load(out) as got:
            assert_matches_native(model, inputs, {n: got[n] for n in got.files})
    finally:
        assert await coord.stop() == 0, coord.tail()


JOBS = 24


async def test_a_coordinator_killed_mid_run_loses_no_job_and_no_job_completes_twice(
    valkey: EmbeddedValkey,
    fleet_ns: str,
    workers: list[str],
    model: Path,
    cache_dir: Path,
    tmp_path: Path,
    broker: Broker,
) -> None:
    """24 jobs, 3 external workers; the coordinator is SIGKILLed with jobs running and another one
    finishes them: every result equals native onnxruntime, the ledger shows one completion per job."""
    argv = coordinator_argv(valkey.url, fleet_ns, cache_dir, "--job-timeout-s", "30", "--max-jobs", "2")
    first = CoordinatorProcess(argv, cache_dir, tmp_path / "first.log")
    second: CoordinatorProcess | None = None
    redis = await open_queue(valkey.url, fleet_ns)
    try:
        inputs = [sample_tokens(1, 4 + i % 12, seed=100 + i) for i in range(JOBS)]
        jobs = [
            await enqueue_inference(
                redis, model=str(model), inputs=x, shards=2, namespace=fleet_ns, cache_dir=cache_dir
            )
            for x in inputs
        ]

        await first.start()

        async def mid_run() -> bool:
            states = [await job.status() for job in jobs]
            return states.count(JobStatus.complete) >= 2 and JobStatus.in_progress in states

        await wait_until(mid_run, 120, "jobs complete and jobs running on the first coordinator")
        # A warm job takes ~40 ms: freeze the workers so the jobs in progress stay in progress until the kill.
        pids = [info.pid for w in workers if (info := await broker.worker_info(w)) is not None]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:

            async def held() -> bool:
                return JobStatus.in_progress in [await job.status() for job in jobs]

            await wait_until(held, 30, "a job in progress on the first coordinator while the workers are frozen")
            first.kill()
            await first.stop()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        second = await CoordinatorProcess(argv, cache_dir, tmp_path / "second.log").start()
        results = [await job.result(timeout=RESULT_TIMEOUT_S) for job in jobs]
        for x, res in zip(inputs, results, strict=True):
            assert_matches_native(model, x, res["result"])
        request_ids = [res["metrics"]["request_id"] for res in results]
        assert len(set(request_ids)) == JOBS
        tries = {r.job_id: r.job_try for r in await finished_jobs(redis, fleet_ns)}
        assert any(tries[j.job_id] > 1 for j in jobs), "no job was taken over from the killed coordinator"
        ledger = await requests_of(broker, [first.service_id, second.service_id])
        completed = sorted(st.request_id for st in ledger if st.status == "done")
        assert completed == sorted(request_ids)  # one completion per job, none for the abandoned requests

        async def orphans_swept() -> bool:
            return not [st for st in await requests_of(broker, [first.service_id]) if st.status == "pending"]

        await wait_until(orphans_swept, 90, "the killed coordinator's requests swept")
    finally:
        await redis.aclose()
        if second is not None:
            assert await second.stop() == 0, second.tail()
