"""The rig ``benchmarks.recovery`` runs its trials on: one deployment (embedded valkey-server, named worker
processes, a ``ModelShardingManager`` given ``redis_url``) and a steady stream of requests through it.

Workers are started as ``python -m shard_worker`` processes like ``LocalWorkers.spawn`` starts them, but
with chosen ids: spares are named ``spare<NNN>-...`` counting down, stage workers ``w<N>-...``. The fleet
offers redistribution targets sorted by worker id (``Fleet.spares``), so this makes the newest idle spare
the one recovery picks, as an operator keeping a spare would expect, instead of a worker busy with
another stage. Nothing here is simulated: faults go to real processes and requests to real browsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from broker.embedded import EmbeddedValkey
from broker.keys import MESSAGE_FIELD, STAGE_GROUP, Keys
from broker.messages import StageHop, decode
from broker.process import die_with_parent
from broker.registry import WorkerInfo
from broker.streams import Broker
from coordinator.errors import AllocationError
from coordinator.manager import ModelShardingManager
from coordinator.runtime.launcher import LocalWorker, LocalWorkers, worker_command
from coordinator.settings import ManagerSettings

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = "wasm"
WAIT_S = 120.0  # workers to register, shards to load
STOP_TIMEOUT_S = 15.0
START_ATTEMPTS = 3
DEFAULTS = ManagerSettings()


@dataclass(frozen=True, slots=True)
class Config:
    key: str
    label: str
    strategy: str
    workers_per_stage: int
    spares: int
    heartbeat_max_age_ms: int = DEFAULTS.heartbeat_max_age_ms
    heartbeat_s: float = DEFAULTS.heartbeat_s


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Load:
    """Open-loop requests, one every ``interval_s`` (at most ``max_in_flight`` at once); each result is
    checked against native onnxruntime on the whole model and its completion time kept by request id."""

    def __init__(
        self,
        manager: ModelShardingManager,
        inputs: list[dict[str, np.ndarray]],
        want: list[np.ndarray],
        interval_s: float,
        max_in_flight: int,
        tolerance: float,
    ) -> None:
        self.manager = manager
        self.inputs, self.want = inputs, want
        self.interval_s, self.max_in_flight, self.tolerance = interval_s, max_in_flight, tolerance
        self.finished: dict[str, float] = {}  # request id -> monotonic time its result came back
        self.submitted: list[float] = []
        self.unfinished: set[int] = set()
        self.errors: list[str] = []
        self.wrong = 0
        self.ok = 0
        self.e2e_ms: list[float] = []
        self.kernel_ms: list[float] = []
        self._finishing = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        i = 0
        while True:
            if len(self._tasks) < self.max_in_flight:
                task = asyncio.get_running_loop().create_task(self._one(i))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                i += 1
            await asyncio.sleep(self.interval_s)

    async def _one(self, i: int) -> None:
        self.submitted.append(time.monotonic())
        self.unfinished.add(i)
        try:
            res = await self.manager.run_inference_sharded(self.inputs[i % len(self.inputs)])
        except Exception as e:  # kept and reported; the stream goes on
            res = {"error": f"{type(e).__name__}: {e}"}
        finally:
            self.unfinished.discard(i)
            self._finishing.set()
        now = time.monotonic()
        rid = res.get("request_id") or res.get("metrics", {}).get("request_id") or f"?{i}"
        self.finished[rid] = now
        if "error" in res:
            self.errors.append(f"{rid}: {res['error']}")
            return
        self.e2e_ms.append(float(res["metrics"]["inference_time_ms"]))
        self.kernel_ms.append(float(res["metrics"]["kernel_time_ms"]))
        got = next(iter(res["result"].values()))
        if float(np.abs(got.astype(np.float64) - self.want[i % len(self.want)]).max()) > self.tolerance:
            self.wrong += 1
        else:
            self.ok += 1

    async def until_finished(self, request_ids: set[str], timeout_s: float) -> dict[str, float]:
        """Completion times of ``request_ids`` (those that finished within ``timeout_s``)."""
        await self._until(lambda: request_ids <= self.finished.keys(), timeout_s)
        return {r: self.finished[r] for r in request_ids if r in self.finished}

    async def until_drained(self, timeout_s: float) -> bool:
        """Wait until every request submitted so far has finished."""
        pending = set(self.unfinished)
        return await self._until(lambda: not pending & self.unfinished, timeout_s)

    async def _until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._finishing.clear()
            if done():
                return True
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finishing.wait(), left_s)

    async def stop(self, timeout_s: float) -> None:
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


class Deployment:
    """Valkey, named workers, the manager; what a trial needs to find, hit and put back a worker."""

    def __init__(self, cfg: Config, model: Path, shards: int, browsers: list[str], workdir: Path) -> None:
        self.cfg, self.model, self.shards, self.browsers = cfg, model, shards, browsers
        self.namespace = f"recbench{uuid.uuid4().hex[:8]}"
        self.settings = ManagerSettings(
            namespace=self.namespace,
            cache_dir=workdir / "cache",
            worker_wait_s=WAIT_S,
            assign_timeout_s=WAIT_S,
            request_timeout_s=WAIT_S,
            heartbeat_s=cfg.heartbeat_s,
            heartbeat_max_age_ms=cfg.heartbeat_max_age_ms,
        )
        self.keys = Keys(self.namespace)
        self.valkey = EmbeddedValkey()
        self.workers: LocalWorkers | None = None
        self.broker: Broker | None = None
        self.redis: aioredis.Redis | None = None
        self.manager: ModelShardingManager | None = None
        self._spares_named = 0
        self._workers_named = 0
        self.spawned = 0
        self.start_failures: list[str] = []

    async def __aenter__(self) -> Deployment:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        cfg, s = self.cfg, self.settings
        await self.valkey.__aenter__()
        self.workers = LocalWorkers(self.valkey.url, self.namespace, s.cache_dir, cfg.heartbeat_s)
        self.broker = Broker(self.valkey.url, self.namespace)
        self.redis = aioredis.Redis.from_url(self.valkey.url)
        # stage i's workers run browsers[i % len]; the manager allocates shards round-robin the same way
        ids = [
            self.spawn(self.browsers[i % len(self.browsers)])
            for i in range(self.shards)
            for _ in range(cfg.workers_per_stage)
        ]
        ids = [await self._registered(wid, spare=False) for wid in ids]
        self.manager = ModelShardingManager(
            str(self.model),
            num_shards=self.shards,
            browsers=self.browsers,
            platform=PLATFORM,
            redis_url=self.valkey.url,
            fault_tolerance_level="medium",
            recovery_strategy=cfg.strategy,
            settings=s,
            progress=progress,
        )
        if not await self.manager.initialize_sharding():
            raise RuntimeError(f"initialize_sharding failed: {self.manager.last_error}")
        # spares join after the plan is assigned, as in xshard fault-test: they hold no shard
        spares = [self.spawn(self.browsers[0], spare=True) for _ in range(cfg.spares)]
        spares = [await self._registered(wid, spare=True) for wid in spares]
        await self.until_seen(spares)

    async def _registered(self, worker_id: str, spare: bool) -> str:
        """``worker_id`` once registered; one that dies or stalls on its way up is replaced (and counted)."""
        assert self.workers is not None and self.broker is not None
        for _ in range(START_ATTEMPTS):
            try:
                await self.workers.wait_registered(self.broker, [worker_id], WAIT_S, self.cfg.heartbeat_max_age_ms)
                return worker_id
            except AllocationError:
                w = self.workers.workers[worker_id]
                why = next((line for line in reversed(w.tail(40).splitlines()) if "xshard worker:" in line), "")
                self.start_failures.append(f"{worker_id}: {why or 'did not register'}")
                progress(f"worker {worker_id} did not come up ({why or 'no registration'}); starting another")
                if w.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(w.process.pid, signal.SIGKILL)
                    await asyncio.to_thread(w.process.wait)
                worker_id = self.spawn(w.browser, spare)
        raise RuntimeError(f"{START_ATTEMPTS} workers in a row failed to start: {self.start_failures[-3:]}")

    async def close(self) -> None:
        if self.manager is not None:
            await self.manager.close()
        if self.workers is not None:
            await self.workers.stop_all()
        if self.broker is not None:
            await self.broker.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.valkey.__aexit__(None, None, None)

    # -- workers -------------------------------------------------------------------------------------

    def spawn(self, browser: str, spare: bool = False) -> str:
        """Start a worker process with a chosen id (``LocalWorkers.spawn`` makes its own)."""
        assert self.workers is not None
        if spare:
            self._spares_named += 1
            worker_id = f"spare{999 - self._spares_named:03d}-{browser}-{uuid.uuid4().hex[:4]}"
        else:
            self._workers_named += 1
            worker_id = f"w{self._workers_named:03d}-{browser}-{uuid.uuid4().hex[:4]}"
        w = self.workers
        w.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = w.log_dir / f"{worker_id}.log"
        cmd = worker_command(w.redis_url, browser, PLATFORM, w.namespace, w.cache_dir, worker_id, w.heartbeat_s)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        w.workers[worker_id] = LocalWorker(worker_id, browser, PLATFORM, proc, log_path)
        self.spawned += 1
        return worker_id

    def process(self, worker_id: str) -> subprocess.Popen[bytes]:
        assert self.workers is not None
        return self.workers.workers[worker_id].process

    def last_log_line(self, worker_id: str) -> str:
        assert self.workers is not None
        lines = [line for line in self.workers.workers[worker_id].tail(60).splitlines() if line.strip()]
        said = [line for line in lines if " exiting: " in line or "xshard worker:" in line]
        return (said or lines or [""])[-1][-300:]

    def browser_of(self, worker_id: str) -> str:
        assert self.workers is not None
        return self.workers.workers[worker_id].browser

    async def start_worker(self, browser: str, spare: bool) -> str:
        wid = await self._registered(self.spawn(browser, spare), spare)
        await self.until_seen([wid])
        return wid

    async def retire(self, worker_id: str) -> None:
        """SIGTERM: the worker unregisters; the coordinator reclaims whatever it still held."""
        proc = self.process(worker_id)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        await self.reap(worker_id)

    async def reap(self, worker_id: str) -> None:
        proc = self.process(worker_id)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)

    async def until_seen(self, ids: list[str], timeout_s: float = WAIT_S) -> None:
        """Wait until the manager's monitor counts these workers as live."""
        assert self.manager is not None
        fleet, deadline = self.manager.fleet, time.monotonic() + timeout_s
        while any(w not in fleet.live or w in fleet.dead for w in ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the manager did not see {ids} alive within {timeout_s}s")
            await asyncio.sleep(0.05)

    async def until_dead(self, worker_id: str, timeout_s: float = WAIT_S) -> None:
        assert self.manager is not None
        deadline = time.monotonic() + timeout_s
        while worker_id in self.manager.fleet.live and worker_id not in self.manager.fleet.dead:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the manager did not see {worker_id} gone within {timeout_s}s")
            await asyncio.sleep(0.05)

    # -- what the manager sees -----------------------------------------------------------------------

    def serving(self) -> dict[int, list[str]]:
        """Stage -> live workers serving it, as the manager's fleet has them."""
        assert self.manager is not None
        fleet = self.manager.fleet
        return {
            i: [w for w in fleet.serving.get(i, []) if w in fleet.live and w not in fleet.dead]
            for i in range(self.shards)
        }

    def idle(self) -> list[str]:
        assert self.manager is not None
        busy = {w for ids in self.manager.fleet.serving.values() for w in ids}
        return sorted(w for w in self.manager.fleet.live if w not in busy and w not in self.manager.fleet.dead)

    def shape(self) -> str:
        """'' when the deployment has its configured shape, else what is off."""
        serving, cfg = self.serving(), self.cfg
        off = [f"stage {i} served by {len(ws)}" for i, ws in serving.items() if len(ws) != cfg.workers_per_stage]
        doubled = sorted({w for ws in serving.values() for w in ws if sum(w in v for v in serving.values()) > 1})
        off += [f"{w} serves several stages" for w in doubled]
        if len(self.idle()) != cfg.spares:
            off.append(f"{len(self.idle())} idle spares")
        return "; ".join(off)

    def stage_of(self, worker_id: str) -> int:
        return next(i for i, ws in self.serving().items() if worker_id in ws)

    def streams_of(self, worker_id: str) -> list[str]:
        assert self.manager is not None
        stages = self.manager.fleet.stages_of(worker_id)
        return [self.manager.route[i] for i in stages] + [self.keys.direct(worker_id)]

    # -- what a worker holds -------------------------------------------------------------------------

    async def held(self, worker_id: str, streams: list[str]) -> list[tuple[str, str]]:
        """(stream, entry id) of the jobs ``worker_id`` has read and not yet handed off."""
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for s in streams:
            pipe.xpending_range(s, STAGE_GROUP, "-", "+", 16, consumername=worker_id)
        replies = await pipe.execute(raise_on_error=False)
        return [
            (s, _str(p["message_id"])) for s, r in zip(streams, replies, strict=True) if isinstance(r, list) for p in r
        ]

    async def undelivered(self, stream: str) -> list[str]:
        """Entry ids on ``stream`` not yet read by any worker of the stage group."""
        assert self.redis is not None
        try:
            groups = await self.redis.xinfo_groups(stream)
        except aioredis.ResponseError:
            return []
        last = next((_str(g["last-delivered-id"]) for g in groups if _str(g["name"]) == STAGE_GROUP), "0-0")
        return [_str(eid) for eid, _ in await self.redis.xrange(stream, f"({last}", "+")]

    async def request_ids(self, entries: list[tuple[str, str]]) -> list[str]:
        assert self.redis is not None
        pipe = self.redis.pipeline(transaction=False)
        for stream, eid in entries:
            pipe.xrange(stream, eid, eid)
        out = []
        for found in await pipe.execute():
            for _, fields in found:
                msg = decode(fields[MESSAGE_FIELD])
                if isinstance(msg, StageHop):
                    out.append(msg.request_id)
        return out

    async def worker_info(self, worker_id: str) -> WorkerInfo | None:
        assert self.broker is not None
        return await self.broker.worker_info(worker_id)
