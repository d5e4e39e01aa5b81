"""Shard files by content hash: real by-hash servers on loopback, announcements in a real valkey, and
the worker's fetcher. A corrupted or truncated copy is refused and another holder's is used; nothing
but ``/<sha256>`` is served; concurrent fetches of one file are one download; holders that stop
announcing are skipped."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import http.client
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from broker.artifact_server import ArtifactServer, Holding, HoldingSettings, ServingAddress, serving_address
from broker.artifacts import ArtifactIndex, Holder, artifact_path, held_hashes
from broker.errors import SettingError
from broker.streams import Broker
from shard_worker.artifacts import ArtifactFetcher, FetchSettings, spread
from shard_worker.errors import ArtifactUnavailable

LOOPBACK = ServingAddress("127.0.0.1", 0)
FAST = FetchSettings(connect_timeout_s=2.0, read_timeout_s=5.0, deadline_s=1.0, chunk_bytes=64 * 1024)


def shard_bytes(size: int = 3 * 1024 * 1024 + 17, seed: int = 1) -> bytes:
    """Stand-in shard content: bytes whose digest names them (any bytes: only the hash matters here)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def put(directory: Path, data: bytes, name_of: bytes | None = None) -> str:
    """Write ``data`` under the hash name of ``name_of`` (default: its own) and return that digest."""
    directory.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(name_of if name_of is not None else data).hexdigest()
    artifact_path(directory, sha).write_bytes(data)
    return sha


@pytest.fixture
async def broker(valkey: Any, namespace: str) -> AsyncIterator[Broker]:
    async with Broker(valkey.url, namespace) as b:
        yield b


async def holding(stack: AsyncExitStack, broker: Broker, holder_id: str, directory: Path) -> Holding:
    return await stack.enter_async_context(Holding(broker, holder_id, directory, LOOPBACK))


def bad_first(holders: Sequence[Holder], fetcher_id: str, sha256: str) -> list[Holder]:
    """A holder order putting the holders named ``bad*`` first (the default ``spread`` is seeded)."""
    return sorted(spread(holders, fetcher_id, sha256), key=lambda h: not h.holder_id.startswith("bad"))


def get(url: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


async def test_a_corrupted_copy_is_refused_and_the_file_is_fetched_from_another_holder(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = shard_bytes()
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    async with AsyncExitStack() as stack:
        bad = await holding(stack, broker, "bad-holder", tmp_path / "bad")
        good = await holding(stack, broker, "good-holder", tmp_path / "good")
        sha = put(bad.directory, bytes(corrupted), name_of=data)
        assert put(good.directory, data) == sha
        bad.announce_now()
        good.announce_now()
        index = ArtifactIndex(broker)
        await wait_for_holders(index, sha, 2)
        fetcher = ArtifactFetcher(index, tmp_path / "mine", "fetcher", FAST, order=bad_first)
        with caplog.at_level(logging.INFO, logger="shard_worker.artifacts"):
            path = await fetcher.ensure(sha)
        assert path == artifact_path(tmp_path / "mine", sha)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
        assert bad.server is not None and good.server is not None
        assert bad.server.served[sha] == 1 and good.server.served[sha] == 1  # asked both: refused the first
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "bad-holder" in refusals[0] and "corrupted" in refusals[0], refusals
    assert leftovers(tmp_path / "mine") == []


async def test_a_truncated_copy_is_refused_and_when_no_holder_has_it_whole_nothing_is_kept(
    broker: Broker, tmp_path: Path
) -> None:
    data = shard_bytes()
    async with AsyncExitStack() as stack:
        short = await holding(stack, broker, "bad-short", tmp_path / "short")
        flipped = await holding(stack, broker, "bad-flipped", tmp_path / "flipped")
        sha = put(short.directory, data[: len(data) // 3], name_of=data)
        put(flipped.directory, data[::-1], name_of=data)
        short.announce_now()
        flipped.announce_now()
        index = ArtifactIndex(broker)
        await wait_for_holders(index, sha, 2)
        fetcher = ArtifactFetcher(index, tmp_path / "mine", "fetcher", FAST)
        with pytest.raises(ArtifactUnavailable) as info:
            await fetcher.ensure(sha)
    reasons = info.value.reasons
    assert sorted(r.split(":")[0] for r in reasons[-2:]) == ["bad-flipped", "bad-short"], reasons
    assert all("corrupted" in r for r in reasons), reasons
    assert not artifact_path(tmp_path / "mine", sha).exists()
    assert leftovers(tmp_path / "mine") == []


async def test_concurrent_fetches_of_one_file_download_it_once_with_progress_in_the_log(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = shard_bytes(8 * 1024 * 1024)
    async with AsyncExitStack() as stack:
        src = await holding(stack, broker, "source", tmp_path / "src")
        sha = put(src.directory, data)
        src.announce_now()
        index = ArtifactIndex(broker)
        await wait_for_holders(index, sha, 1)
        fetcher = ArtifactFetcher(index, tmp_path / "mine", "fetcher", dataclasses.replace(FAST, progress_every_s=0))
        with caplog.at_level(logging.INFO, logger="shard_worker.artifacts"):
            paths = await asyncio.gather(*(fetcher.ensure(sha) for _ in range(8)))
        assert len(set(paths)) == 1 and paths[0].read_bytes() == data
        assert src.server is not None and src.server.served[sha] == 1
        assert await fetcher.ensure(sha) == paths[0] and src.server.served[sha] == 1  # already here: no fetch
    progress = [r.getMessage() for r in caplog.records if "MiB (" in r.getMessage()]
    assert progress and all(sha[:12] in line and "source" in line for line in progress), progress
    assert "of 8.0 MiB (100%)" in progress[-1], progress[-1]


async def test_the_server_serves_only_hash_names_from_its_directory(tmp_path: Path) -> None:
    data = shard_bytes(1000)
    sha = put(tmp_path / "shards", data)
    (tmp_path / "shards" / "notes.txt").write_text("not a shard")
    (tmp_path / "secret").write_text("outside")
    server = ArtifactServer(tmp_path / "shards", "127.0.0.1").start()
    try:
        assert get(server.url, f"/{sha}") == (200, data)
        status, body = get(server.url, f"/{sha}", "HEAD")
        assert (status, body) == (200, b"")
        for path in (
            f"/{sha}.onnx",
            f"/shards/{sha}.onnx",
            f"/{sha.upper()}",
            f"/{sha}?x=1",
            f"/{'0' * 64}",
            "/notes.txt",
            "/../secret",
            "/%2e%2e/secret",
            "/",
        ):
            assert get(server.url, path)[0] == 404, path
        assert get(server.url, f"/{sha}", "PUT")[0] == 501
    finally:
        server.close()
    assert sorted(os.listdir(tmp_path / "shards")) == sorted([f"{sha}.onnx", "notes.txt"])


async def test_a_holder_that_stops_announcing_is_skipped_and_forgotten(broker: Broker, tmp_path: Path) -> None:
    sha = put(tmp_path / "a", shard_bytes(100))
    index = ArtifactIndex(broker)
    await index.announce("gone", "http://127.0.0.1:9", [sha], ttl_ms=100)
    await index.announce("here", "http://127.0.0.1:10", [sha], ttl_ms=60_000)
    assert [h.holder_id for h in await index.holders(sha)] == ["gone", "here"]
    await asyncio.sleep(0.3)
    assert await index.holders(sha) == [Holder("here", "http://127.0.0.1:10")]
    assert await broker.set_members(broker.keys.artifact(sha)) == ["here"]
    await index.withdraw("here", [sha])
    assert await index.holders(sha) == []


async def test_a_holding_announces_what_it_holds_and_withdraws_on_close(broker: Broker, tmp_path: Path) -> None:
    shas = sorted([put(tmp_path / "d", shard_bytes(100, seed=s)) for s in (1, 2)])
    (tmp_path / "d" / f".{shas[0]}.1234.part").write_bytes(b"partial")  # a download under way is not held
    assert held_hashes(tmp_path / "d") == shas
    index = ArtifactIndex(broker)
    async with Holding(broker, "h1", tmp_path / "d", LOOPBACK, HoldingSettings(ttl_ms=2000, refresh_s=0.2)) as h:
        for sha in shas:
            assert await index.holders(sha) == [Holder("h1", h.url)]
        third = put(tmp_path / "d", shard_bytes(100, seed=3))
        h.announce_now()
        await wait_for_holders(index, third, 1)
    for sha in [*shas, third]:
        assert await index.holders(sha) == []


def test_the_serving_address_is_the_route_to_the_broker_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XSHARD_ARTIFACT_URL", raising=False)
    assert serving_address("redis://127.0.0.1:6379/0") == ServingAddress("127.0.0.1", 0)
    assert serving_address("redis://:pw@127.0.0.1:6379/0", "http://10.1.2.3:8710") == ServingAddress(
        "0.0.0.0", 8710, "http://10.1.2.3:8710"
    )
    monkeypatch.setenv("XSHARD_ARTIFACT_URL", "http://shards.example:8711/")
    assert serving_address("redis://127.0.0.1/0").announced_url == "http://shards.example:8711"
    for bad in ("https://h:1", "http://h", "http://h:1/path", "h:1"):
        with pytest.raises(SettingError):
            serving_address("redis://127.0.0.1/0", bad)


async def wait_for_holders(index: ArtifactIndex, sha: str, n: int, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(await index.holders(sha)) < n:
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {n} holders of {sha[:12]} announced"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("enable_ipfs", [True, False])
async def test_enable_ipfs_says_whether_the_coordinator_serves_its_shard_files_by_hash(
    enable_ipfs: bool, valkey: Any, namespace: str, tmp_path: Path
) -> None:
    """True: the coordinator is announced as a holder of every shard file (other hosts fetch them by hash);
    False: it announces none, and a worker sharing its cache directory still loads them."""
    from coordinator import ManagerSettings, ModelShardingManager
    from tests.conftest import require_browsers
    from tests.faults_support import start_xshard_worker, stop_processes
    from tests.onnx_models import residual_mlp

    require_browsers("chromium")
    model, cache = residual_mlp(tmp_path / "mlp.onnx", layers=2, hidden=16, vocab=50), tmp_path / "cache"
    proc = start_xshard_worker(valkey.url, "chromium", namespace, cache, f"chromium-{namespace}")
    settings = ManagerSettings(cache_dir=cache, namespace=namespace, worker_wait_s=60)
    manager = ModelShardingManager(
        str(model), 1, enable_ipfs=enable_ipfs, browsers=["chromium"], redis_url=valkey.url, settings=settings
    )
    try:
        assert await manager.initialize_sharding(), manager.last_error
        assert manager.shards is not None and manager.shards.shard_sha256
        async with Broker(valkey.url, namespace) as broker:
            index = ArtifactIndex(broker)
            for sha256 in manager.shards.shard_sha256:
                holders = {h.holder_id for h in await index.holders(sha256)}
                assert (manager.coordinator_id in holders) is enable_ipfs, holders
    finally:
        await manager.close()
        stop_processes([proc])


def test_enable_ipfs_must_be_a_bool() -> None:
    from coordinator import ModelShardingManager

    with pytest.raises(ValueError, match="enable_ipfs must be True or False"):
        ModelShardingManager("model.onnx", 2, enable_ipfs="no")  # type: ignore[arg-type]
