"""A worker is known gone before its heartbeat lapses: its named connections closed (CLIENT LIST on a real
valkey-server), or its process exited. Absence counts only after two reads in a row."""

from __future__ import annotations

import time
from typing import Any

from broker.registry import WorkerInfo, WorkerState
from broker.streams import Broker
from coordinator.runtime.liveness import Liveness
from tests.faults_support import wait_until


async def gone_from_client_list(broker: Broker, worker_id: str) -> bool:
    return worker_id not in (await broker.connected_workers()).worker_ids


def info(worker_id: str) -> WorkerInfo:
    now = int(time.time() * 1000)
    return WorkerInfo(worker_id, "chromium", "wasm", "wasm", "wasm", "ua", "host", 1, 2, now, now, WorkerState.READY)


async def test_a_worker_whose_named_connections_closed_is_gone_at_the_second_read(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as coordinator:
        liveness = Liveness(coordinator)
        a, b = Broker(valkey.url, namespace, worker_id="a"), Broker(valkey.url, namespace, worker_id="b")
        await a.ping()
        await b.ping()
        live = [info("a"), info("b")]
        assert await liveness.gone(live) == {}
        await a.close()
        await wait_until(lambda: gone_from_client_list(coordinator, "a"), 5.0, "the server to drop a's connection")
        assert await liveness.gone(live) == {}, "one read without its connections is not enough"
        assert await liveness.gone(live) == {"a": "its connections to the broker closed"}
        await b.close()


async def test_a_worker_never_seen_connected_is_not_taken_for_gone(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as coordinator:
        liveness = Liveness(coordinator)
        live = [info("unnamed")]  # an older worker that does not name its connections
        for _ in range(3):
            assert await liveness.gone(live) == {}


async def test_a_worker_whose_process_exited_is_gone_at_once(valkey: Any, namespace: str) -> None:
    async with Broker(valkey.url, namespace) as coordinator:
        w = Broker(valkey.url, namespace, worker_id="w")
        await w.ping()
        exited: list[str] = []
        liveness = Liveness(coordinator, lambda: exited)
        assert await liveness.gone([info("w")]) == {}
        exited.append("w")
        assert await liveness.gone([info("w")]) == {"w": "its process exited"}
        await w.close()
