"""Across hosts: a broker with a password (and TLS), and workers on other hosts that fetch their shard
files by hash, tested with network namespaces as the hosts.

The password never shows: not in ``redact``ed text, not in the output of ``xshard broker``, ``xshard
status`` or ``xshard worker``, not in an error, not in any log of a multi-host run. ``rediss://`` is
checked through a real TLS terminator in front of a real valkey (the valkey-server of the wheel has no
TLS built in). The multi-host test builds three hosts (a broker and coordinator host, two worker hosts
with a Chromium and a Firefox worker each), cuts one worker host's link in the middle of 30 MiniLM
requests, and checks every output against native onnxruntime and the worker hosts' caches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from subprocess import Popen
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import redis

from broker.address import CA_FILE_ENV, connection_options, has_password, redact
from broker.artifacts import held_hashes
from broker.embedded import EmbeddedValkey, free_port
from broker.errors import BrokerUnavailable, SettingError
from broker.messages import Release
from broker.streams import Broker
from tests.conftest import require_browsers
from tests.faults_support import TOLERANCE, stop_processes
from tests.native import max_diff_unmasked
from tests.netns import Host, Network, why_refused

PASSWORD = "pw-" + secrets.token_urlsafe(12)
REPO = Path(__file__).resolve().parent.parent


# -- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("redis://:s3cret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://alice:s3cret@broker.example:6380/2", "rediss://alice:***@broker.example:6380/2"),
        ("redis://:p@ss:w0rd@h:1/0", "redis://:***@h:1/0"),
        ("ping redis://:x@h:1/0: broker unreachable: refused", "ping redis://:***@h:1/0: broker unreachable: refused"),
        ("a redis://:x@h/0 and rediss://u:y@g/1", "a redis://:***@h/0 and rediss://u:***@g/1"),
        ("redis://h:1/0?password=s3cret&db=1", "redis://h:1/0?password=***&db=1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://alice@h:1/0", "redis://alice@h:1/0"),
        ("no url here: a:b@c", "no url here: a:b@c"),
    ],
)
def test_redact_hides_every_password_of_a_url_and_nothing_else(text: str, want: str) -> None:
    assert redact(text) == want
    assert has_password(text) == (text != want)


def test_a_broker_url_of_another_scheme_is_refused_without_showing_its_password() -> None:
    with pytest.raises(SettingError) as info:
        Broker("http://:hunter2@h:1/0")
    assert "hunter2" not in str(info.value) and "http://:***@h:1/0" in str(info.value)


# -- a broker with a password ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey(password=PASSWORD) as server:
        yield server


def no_password_in(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text, text[-2000:]


async def test_the_password_opens_the_broker_and_errors_never_show_it(guarded: EmbeddedValkey) -> None:
    assert guarded.display_url == f"redis://:***@127.0.0.1:{guarded.port}/0"
    async with Broker(guarded.url, "auth") as broker:
        await broker.add(broker.keys.control("w"), Release("s"))
    for url in (
        f"redis://:wrong-{PASSWORD}@127.0.0.1:{guarded.port}/0",  # refused
        f"redis://127.0.0.1:{guarded.port}/0",  # none given
        f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",  # nobody listens
    ):
        with pytest.raises(BrokerUnavailable) as info:
            async with Broker(url, "auth"):
                pass
        no_password_in(str(info.value), repr(info.value))
        assert "broker" in str(info.value)


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_xshard_status_and_worker_never_print_the_password(guarded: EmbeddedValkey) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    ok = cli("status", "--namespace", ns, env={"REDIS_URL": guarded.url})
    assert ok.returncode == 0, ok.stderr
    assert f"namespace {ns}" in ok.stdout
    no_password_in(ok.stdout, ok.stderr)
    wrong = guarded.url.replace(PASSWORD, f"{PASSWORD}-not")
    refused = cli("status", "--namespace", ns, "--redis", wrong)
    assert refused.returncode != 0 and "redis://:***@" in refused.stderr, refused.stderr
    no_password_in(refused.stdout, refused.stderr)
    worker = cli("worker", "--browser", "chromium", "--namespace", ns, env={"REDIS_URL": wrong})
    assert worker.returncode == 2 and "xshard worker:" in worker.stderr, worker.stderr
    no_password_in(worker.stdout, worker.stderr)


def test_xshard_broker_requirepass_asks_for_the_password_and_never_prints_it(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "XSHARD_BROKER_PASSWORD": PASSWORD}
    cmd = [sys.executable, "-m", "coordinator.cli", "broker", "--requirepass", "--port", str(port)]
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as o, err.open("w") as e:
        proc = Popen(cmd, stdout=o, stderr=e, env=env, cwd=REPO)
    try:
        wait_for_line(out, "REDIS_URL=", proc)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert redis.Redis(port=port, password=PASSWORD).ping()
        server_args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        no_password_in(server_args)
    finally:
        stop_processes([proc])
    no_password_in(out.read_text(), err.read_text())
    assert f"REDIS_URL=redis://:***@127.0.0.1:{port}/0" in out.read_text()
    assert "password: in $XSHARD_BROKER_PASSWORD" in err.read_text()


def test_xshard_broker_requirepass_without_a_password_writes_a_new_one_only_its_owner_reads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XSHARD_BROKER_PASSWORD"}
    pw_file, port = tmp_path / "pw", free_port()
    cmd = [sys.executable, "-m", "coordinator.cli", "broker", "--requirepass", "--password-file", str(pw_file)]
    out = tmp_path / "out"
    with out.open("w") as o:
        proc = Popen([*cmd, "--port", str(port)], stdout=o, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        wait_for_line(out, "REDIS_URL=", proc)
        password = pw_file.read_text().strip()
        assert len(password) >= 24 and pw_file.stat().st_mode & 0o777 == 0o600
        assert redis.Redis(port=port, password=password).ping()
    finally:
        stop_processes([proc])
    assert password not in out.read_text() and str(pw_file) in out.read_text()


# -- TLS --------------------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it; another CA that signed nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the TLS test makes its certificates with it")
    d = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "other-ca"):
        key = ["-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key"]
        openssl("req", "-x509", *key, "-out", f"{ca}.crt", "-days", "1", "-subj", f"/CN=xshard test {ca}", cwd=d)
    key = ["-newkey", "rsa:2048", "-nodes", "-keyout", "server.key"]
    openssl("req", *key, "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"]
    openssl("x509", "-req", "-in", "server.csr", *sign, "-out", "server.crt", "-days", "1", cwd=d)
    return d


@contextlib.asynccontextmanager
async def tls_front(certs: Path, target_port: int) -> AsyncIterator[int]:
    """A TLS terminator on a free loopback port forwarding to valkey (what stunnel does in front of it)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=ctx)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_a_rediss_url_is_verified_against_the_configured_ca(
    guarded: EmbeddedValkey, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tls_front(certs, guarded.port) as port:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
        async with Broker(url, "tls", ca_file=str(certs / "ca.crt")) as broker:
            await broker.add(broker.keys.control("w"), Release("s"))
            assert len(await broker.read(broker.keys.control("w"), "0", block_ms=100)) == 1
        monkeypatch.setenv(CA_FILE_ENV, str(certs / "ca.crt"))
        async with Broker(url, "tls") as broker:  # the CA file from the environment
            await broker.ping()
        monkeypatch.setenv(CA_FILE_ENV, str(certs / "other-ca.crt"))
        with pytest.raises(BrokerUnavailable) as info:
            async with Broker(url, "tls"):
                pass
        assert "certificate" in str(info.value).lower(), info.value
        no_password_in(str(info.value))
    assert connection_options(f"redis://:{PASSWORD}@h/0") == {}
    with pytest.raises(SettingError, match="does not exist") as missing:
        connection_options(url, str(certs / "absent.crt"))
    no_password_in(str(missing.value))


# -- separate hosts --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """Hosts a (broker, coordinator), b and c (workers) on one switch; removed even when a test fails."""
    reason = why_refused()
    if reason is not None:
        pytest.skip(reason)
    net = Network(tmp_path_factory.mktemp("hosts"))
    try:
        net.start()
        for name in ("a", "b", "c"):
            net.add(name)
        yield net
    finally:
        net.close()


def start_on(host: Host, argv: Sequence[str], log: Path, env: dict[str, str]) -> Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        return Popen(
            host.command(argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
        )


@pytest.mark.browser
async def test_workers_on_two_hosts_fetch_shards_by_hash_and_a_cut_host_loses_no_request(
    network: Network, tmp_path: Path
) -> None:
    require_browsers("chromium", "firefox")
    a, b, c = (network.hosts[n] for n in ("a", "b", "c"))
    ns, port, logs, out = f"t{uuid.uuid4().hex[:8]}", 6390, tmp_path / "logs", tmp_path / "out"
    url = f"redis://:{PASSWORD}@{a.address}:{port}/0"
    py = sys.executable
    procs: list[Popen[bytes]] = []
    started = time.monotonic()
    try:
        broker_cmd = [py, "-m", "coordinator.cli", "broker", "--bind", a.address, "--port", str(port), "--requirepass"]
        procs.append(start_on(a, broker_cmd, logs / "broker.log", {"XSHARD_BROKER_PASSWORD": PASSWORD}))
        wait_for_line(logs / "broker.log", "REDIS_URL=", procs[0])
        workers = [f"{h.name}-{browser}" for h in (b, c) for browser in ("chromium", "firefox")]
        for wid in workers:
            host = network.hosts[wid[0]]
            argv = [py, "-m", "coordinator.cli", "worker", "--browser", wid[2:], "--namespace", ns]
            argv += ["--worker-id", wid, "--platform", "wasm", "--wasm-threads", "1", "--log-level", "INFO"]
            procs.append(start_on(host, argv, logs / f"{wid}.log", {"REDIS_URL": url}))
        argv = [py, "-m", "tests.hosts_coordinator", "--namespace", ns, "--cache-dir", str(a.cache)]
        argv += ["--out", str(out), "--workers", *workers, "--lost", "b-chromium", "b-firefox"]
        argv += ["--cut", json.dumps(b.cut), "--restore", json.dumps(b.restore)]
        coordinator = start_on(a, argv, logs / "coordinator.log", {"REDIS_URL": url})
        procs.append(coordinator)
        rc = await asyncio.to_thread(coordinator.wait, 900)
        assert rc == 0, tail(logs / "coordinator.log")
    finally:
        stop_processes(procs)
        print(f"multi-host run: {time.monotonic() - started:.0f} s wall")
    summary = json.loads((out / "summary.json").read_text())
    check_run(summary, out, (b, c), a)
    for log in sorted(logs.iterdir()):
        no_password_in(log.read_text(errors="replace"))


def check_run(summary: dict[str, Any], out: Path, worker_hosts: Sequence[Host], coordinator_host: Host) -> None:
    assert summary["errors"] == {}, summary["errors"]
    native = ort.InferenceSession(summary["model_path"], providers=["CPUExecutionProvider"])  # the whole model
    names = [o.name for o in native.get_outputs()]
    for i in range(30):
        with np.load(out / f"req_{i}.npz") as z:
            inputs = {k: z[k] for k in ("input_ids", "attention_mask")}
            outputs = {k.removeprefix("out_"): z[k] for k in z.files if k.startswith("out_")}
        assert sorted(outputs) == sorted(names), (i, sorted(outputs))
        for name, want in zip(names, native.run(names, inputs), strict=True):
            diff = max_diff_unmasked(outputs[name], want, None)
            assert diff <= TOLERANCE, f"request {i} output {name}: max abs diff {diff} > {TOLERANCE}"
    assert summary["broker"].startswith("redis://:***@"), summary["broker"]
    for shard, entry in summary["allocation"].items():  # each shard has a replica on each worker host
        served_by = {entry["worker_id"], *(r["worker_id"] for r in entry.get("replicas", []))}
        assert {w[0] for w in served_by} == {"b", "c"}, (shard, served_by)
    assert summary["declared_dead_s"] >= 0, "the cut host's workers were never declared dead"
    assert summary["rejoined_s"] >= 0, "the cut host's workers did not heartbeat again after the link came back"
    shards = sorted(summary["shards"])
    for host in [*worker_hosts, coordinator_host]:
        shard_dir = host.cache / "shards"
        assert held_hashes(shard_dir) == shards, (host.name, sorted(os.listdir(shard_dir)))
        for sha in shards:
            assert hashlib.sha256((shard_dir / f"{sha}.onnx").read_bytes()).hexdigest() == sha
        assert not [n for n in os.listdir(shard_dir) if n.endswith(".part")]


# -- helpers -------------------------------------------------------------------------------------


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def wait_for_line(path: Path, prefix: str, proc: Popen[bytes], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited with {proc.returncode}: {tail(path)}")
        time.sleep(0.05)
    pytest.fail(f"no {prefix!r} line in {path} after {timeout_s}s: {tail(path)}")
