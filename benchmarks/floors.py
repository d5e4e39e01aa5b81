"""The Redis Streams floor a hop is compared with: round trips of one encoded ``StageHop`` on a
valkey-server, from redis.asyncio.

``Floors.sample()`` takes one sample of every variant, so a benchmark can interleave floor samples
with its own requests and both see the same load (this machine's cores are shared).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable
from types import TracebackType

import redis.asyncio as aioredis

from benchmarks.report import summarize
from broker.keys import MESSAGE_FIELD, STAGE_GROUP, Keys
from broker.messages import StageHop, decode, encode
from broker.streams import Broker
from coordinator.model.graph import GraphProfile
from coordinator.model.validation import validate_inputs
from shard_worker.bridge import decode_frame, encode_frame

BLOCK_MS = 5000
READY = b"ready"
ECHO_START_TIMEOUT_MS = 30_000
ECHO_STOP_TIMEOUT_S = 5.0

VARIANTS = {
    "raw": "XADD + XREADGROUP + XACK of pre-encoded bytes: the floor",
    "codec": "raw, with encode + decode of the StageHop in the loop",
    "wake": "XADD -> reader already blocked in XREADGROUP (2nd connection) -> XACK",
    "broker": "Broker.add + read_group + ack (XACK+XDEL MULTI), codec included",
    "xproc": "half a ping-pong with a 2nd process that hands off like a worker",
}


def echo_main(url: str, inbox: str, outbox: str) -> None:
    """Second process of the ``xproc`` variant: forward each entry like a worker's ``hand_off``."""
    asyncio.run(_echo(url, inbox, outbox))


async def _echo(url: str, inbox: str, outbox: str) -> None:
    r = aioredis.Redis.from_url(url)
    try:
        await r.xadd(outbox, {MESSAGE_FIELD: READY})
        while True:
            reply = await r.xreadgroup(STAGE_GROUP, "echo", {inbox: ">"}, count=1, block=1000)
            for _, entries in reply or []:
                for eid, fields in entries:
                    pipe = r.pipeline(transaction=True)
                    pipe.xadd(outbox, fields)
                    pipe.xack(inbox, STAGE_GROUP, eid)
                    pipe.xdel(inbox, eid)
                    await pipe.execute()
    finally:
        await r.aclose()


class Floors:
    """Clients, streams, a blocked reader and an echo process on the server at ``url``."""

    def __init__(self, url: str, job: StageHop) -> None:
        self.url = url
        self.job = job
        self.payload = encode(job)
        self.keys = Keys(f"floor{uuid.uuid4().hex[:8]}")
        self.streams = {
            name: self.keys.stage("floor", i)
            for i, name in enumerate(("raw", "codec", "wake", "broker", "ping", "pong"))
        }
        self._client = aioredis.Redis.from_url(url)
        self._reader = aioredis.Redis.from_url(url)
        self._broker = Broker(url, self.keys.ns)
        self._acked: asyncio.Queue[float] = asyncio.Queue()
        self._acked_ids: list[tuple[str, bytes]] = []
        self._read_task: asyncio.Task[None] | None = None
        self._echo: multiprocessing.process.BaseProcess | None = None

    async def __aenter__(self) -> Floors:
        try:
            for stream in self.streams.values():
                await self._client.xgroup_create(stream, STAGE_GROUP, id="0", mkstream=True)
            self._read_task = asyncio.get_running_loop().create_task(self._read_loop())
            ctx = multiprocessing.get_context("spawn")
            self._echo = ctx.Process(
                target=echo_main, args=(self.url, self.streams["ping"], self.streams["pong"]), daemon=True
            )
            self._echo.start()
            ready = await self._read_one("pong", ECHO_START_TIMEOUT_MS)
            if ready != READY:
                raise RuntimeError(f"echo process sent {ready[:20]!r} instead of {READY!r}")
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        if self._echo is not None:
            self._echo.terminate()
            await asyncio.to_thread(self._echo.join, ECHO_STOP_TIMEOUT_S)
            if self._echo.is_alive():
                self._echo.kill()
                await asyncio.to_thread(self._echo.join, ECHO_STOP_TIMEOUT_S)
        try:
            await self._client.delete(*self.streams.values())
        finally:
            await self._broker.close()
            await self._reader.aclose()
            await self._client.aclose()

    async def _read_one(self, name: str, block_ms: int = BLOCK_MS) -> bytes:
        """XREADGROUP one entry of ``name``, XACK it; returns its message field."""
        stream = self.streams[name]
        reply = await self._client.xreadgroup(STAGE_GROUP, "c", {stream: ">"}, count=1, block=block_ms)
        if not reply:
            raise RuntimeError(f"no entry on {stream} within {block_ms} ms")
        [(_, [(eid, fields)])] = reply
        await self._client.xack(stream, STAGE_GROUP, eid)
        self._acked_ids.append((stream, eid))
        return bytes(fields[MESSAGE_FIELD])

    async def _read_loop(self) -> None:
        stream = self.streams["wake"]
        while True:
            reply = await self._reader.xreadgroup(STAGE_GROUP, "r", {stream: ">"}, count=1, block=BLOCK_MS)
            for _, entries in reply or []:
                for eid, _fields in entries:
                    await self._reader.xack(stream, STAGE_GROUP, eid)
                    self._acked.put_nowait(time.perf_counter())
                    await self._reader.xdel(stream, eid)

    async def sample(self, rotate: int = 0) -> dict[str, float]:
        """One round trip of every variant, in ms; ``rotate`` shifts their order (spreads order bias)."""
        steps = [self._raw, self._codec, self._wrapped, self._xproc, self._wake]
        k = rotate % len(steps)
        out: dict[str, float] = {}
        for step in steps[k:] + steps[:k]:
            name, ms = await step()
            out[name] = ms
        for stream, eid in self._acked_ids:  # outside the timing: keep the streams empty
            await self._client.xdel(stream, eid)
        self._acked_ids.clear()
        return out

    async def _raw(self) -> tuple[str, float]:
        t0 = time.perf_counter()
        await self._client.xadd(self.streams["raw"], {MESSAGE_FIELD: self.payload})
        await self._read_one("raw")
        return "raw", (time.perf_counter() - t0) * 1000.0

    async def _codec(self) -> tuple[str, float]:
        t0 = time.perf_counter()
        await self._client.xadd(self.streams["codec"], {MESSAGE_FIELD: encode(self.job)})
        if not isinstance(decode(await self._read_one("codec")), StageHop):
            raise RuntimeError("floor entry did not decode to a StageHop")
        return "codec", (time.perf_counter() - t0) * 1000.0

    async def _wrapped(self) -> tuple[str, float]:
        t0 = time.perf_counter()
        await self._broker.add(self.streams["broker"], self.job)
        [d] = await self._broker.read_group(STAGE_GROUP, "c", [self.streams["broker"]], count=1, block_ms=BLOCK_MS)
        await self._broker.ack(d.stream, STAGE_GROUP, d.entry_id)
        return "broker", (time.perf_counter() - t0) * 1000.0

    async def _xproc(self) -> tuple[str, float]:
        t0 = time.perf_counter()
        await self._client.xadd(self.streams["ping"], {MESSAGE_FIELD: self.payload})
        echoed = await self._read_one("pong")
        ms = (time.perf_counter() - t0) * 1000.0 / 2.0
        if len(echoed) != len(self.payload):
            raise RuntimeError("the echo process changed the payload")
        return "xproc", ms

    async def _wake(self) -> tuple[str, float]:
        await asyncio.sleep(0.002)  # the blocked reader re-enters XREADGROUP
        t0 = time.perf_counter()
        await self._client.xadd(self.streams["wake"], {MESSAGE_FIELD: self.payload})
        return "wake", (await asyncio.wait_for(self._acked.get(), BLOCK_MS / 1000.0) - t0) * 1000.0


def python_costs(profile: GraphProfile, job: StageHop, reps: int = 200) -> dict[str, dict[str, float]]:
    """Per-call CPU cost of the Python-side steps of a hop, in this process."""
    x = job.tensors["x"]
    encoded = encode(job)
    reply = {"op": "result", "id": 1, "kernel_ms": 0.1, "provider": "wasm", "adapter": "a"}
    frame_in = encode_frame(reply, {"y": x})
    steps: dict[str, Callable[[], object]] = {
        "messages.encode(StageHop)": lambda: encode(job),
        "messages.decode(StageHop)": lambda: decode(encoded),
        "bridge.encode_frame (to page)": lambda: encode_frame({"op": "run", "key": "k", "id": 1}, {"x": x}),
        "bridge.decode_frame (from page)": lambda: decode_frame(frame_in),
        "validate_inputs": lambda: validate_inputs({"x": x}, profile.inputs, profile.vocab_limits),
    }
    out = {}
    for name, fn in steps.items():
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000.0)
        out[name] = summarize(samples)
    return out
