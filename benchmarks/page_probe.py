"""Driving one shard page over the worker's WebSocket bridge directly, without Redis, to see what a
page round trip costs and why.

Ways to start the browser (``LAUNCHES``):

- ``worker``: ``shard_worker.browser.BrowserProcess``, as the worker does: for Chromium, Playwright is
  attached over CDP until the page has said hello, then detached (``detach_devtools``), so the page's
  DevTools Network domain no longer copies the bridge's frames;
- ``bare``: Chromium with the worker's flags and no CDP client at all;
- ``bare+runtime``: bare Chromium plus one raw CDP client on the page that enables only ``Runtime`` and
  ``Inspector`` (what console forwarding and crash detection need);
- ``bare+network``: bare Chromium plus one raw CDP client that enables only ``Network``.

The raw CDP client counts the bytes DevTools pushes to it (binary WebSocket frames arrive base64-encoded).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from benchmarks.report import summarize
from broker.browsers import find_executable, find_ort_dist, install_hint
from shard_worker.bridge import Bridge
from shard_worker.browser import CHROMIUM_FLAGS, BrowserProcess, stop_process_group
from shard_worker.errors import PageError
from shard_worker.server import StaticServer

PAGE_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0
LAUNCHES: dict[str, tuple[str, ...]] = {  # launch -> CDP domains a raw client enables
    "worker": (),
    "bare": (),
    "bare+runtime": ("Runtime", "Inspector"),
    "bare+network": ("Network",),
}
QUIET_S = 0.5


class BareChromium:
    """Chromium started with the worker's flags; optionally one raw CDP client enabling ``domains``."""

    def __init__(self, url: str, domains: tuple[str, ...]) -> None:
        self.url = url
        self.domains = domains
        self.cdp_bytes = 0
        self.cdp_events = 0
        self._profile = Path(tempfile.mkdtemp(prefix="xshard-bench-chromium-"))
        self._proc: asyncio.subprocess.Process | None = None
        self._cdp: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def launch(self) -> BareChromium:
        exe = find_executable("chromium")
        if exe is None:
            raise RuntimeError(install_hint("chromium"))
        args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", self.url]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._devtools_port = await self._read_devtools_port()
        self._tasks.append(asyncio.get_running_loop().create_task(self._drain_stderr()))
        return self

    async def _read_devtools_port(self) -> int:
        assert self._proc and self._proc.stderr
        async with asyncio.timeout(PAGE_TIMEOUT_S):
            while line := await self._proc.stderr.readline():
                m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
                if m:
                    return int(m.group(1))
        raise RuntimeError("chromium did not print its DevTools endpoint")

    async def _drain_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        while await self._proc.stderr.readline():
            pass

    async def attach(self) -> None:
        """Attach to the page target and enable ``domains``; count what DevTools sends back."""
        if not self.domains:
            return
        listing = f"http://127.0.0.1:{self._devtools_port}/json/list"
        targets = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(listing, timeout=5)))
        page = next(t for t in targets if t.get("type") == "page" and t["url"].startswith("http://127.0.0.1"))
        self._cdp = await connect(page["webSocketDebuggerUrl"], max_size=None, ping_interval=None)
        for i, domain in enumerate(self.domains, start=1):
            await self._cdp.send(json.dumps({"id": i, "method": f"{domain}.enable"}))
        self._tasks.append(asyncio.get_running_loop().create_task(self._count_cdp()))

    async def _count_cdp(self) -> None:
        assert self._cdp is not None
        async for raw in self._cdp:
            self.cdp_events += 1
            self.cdp_bytes += len(raw)

    async def settle(self, limit_s: float = 10.0) -> None:
        """Wait until DevTools has sent nothing for ``QUIET_S`` (events lag behind under load)."""
        deadline = time.monotonic() + limit_s
        seen = -1
        while seen != self.cdp_bytes and time.monotonic() < deadline:
            seen = self.cdp_bytes
            await asyncio.sleep(QUIET_S)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._cdp is not None:
            await self._cdp.close()
        if self._proc is not None:
            await stop_process_group(self._proc, CLOSE_TIMEOUT_S)
        shutil.rmtree(self._profile, ignore_errors=True)


async def timed(n: int, warmup: int, once: Callable[[], Awaitable[None]]) -> dict[str, float]:
    samples = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        await once()
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1000.0)
    return summarize(samples)


async def _open_page(browser: str, launch: str, url: str, bridge: Bridge) -> BrowserProcess | BareChromium:
    """The page at ``url`` launched as ``launch`` says, once it said hello on ``bridge``."""
    if launch == "worker":
        proc: BrowserProcess | BareChromium = await BrowserProcess(browser, url).launch()
    else:
        proc = await BareChromium(url, LAUNCHES[launch]).launch()
    await bridge.wait_hello(PAGE_TIMEOUT_S)
    if isinstance(proc, BareChromium):
        await proc.attach()
    else:
        await proc.detach_devtools()  # as shard_worker.page.Page.launch does once the page is up
    return proc


async def probe_page(
    browser: str,
    launch: str,
    shard: tuple[Path, str, str],
    x: np.ndarray,
    platform: str,
    n: int,
    warmup: int,
) -> dict[str, Any]:
    """Ping, frame-in-only and full identity runs against one page; ``shard`` = (dir, sha256, input)."""
    shard_dir, sha, input_name = shard
    ort_dir = find_ort_dist()
    if ort_dir is None:
        raise RuntimeError("onnxruntime-web is not installed (npm ci)")
    if launch not in LAUNCHES or (launch != "worker" and browser != "chromium"):
        raise ValueError(f"launch {launch!r} is not available for {browser}")
    server = StaticServer(ort_dir, shard_dir).start()
    bridge = await Bridge().start()
    proc: BrowserProcess | BareChromium | None = None
    try:
        url = f"http://127.0.0.1:{server.port}/#ws={bridge.port}&token={bridge.token}&platform={platform}&threads=0&faults=1"
        proc = await _open_page(browser, launch, url, bridge)
        await bridge.request("load", PAGE_TIMEOUT_S, key="probe", url=f"/shards/{sha}.onnx", platform=platform)

        async def ping() -> None:
            await bridge.request("release", PAGE_TIMEOUT_S, key="not-loaded")

        async def frame_in() -> None:
            try:
                await bridge.run("probe", {input_name: x}, PAGE_TIMEOUT_S, fail="probe")
            except PageError:
                return
            raise RuntimeError("the page ran a job that was told to fail")

        kernels: list[float] = []

        async def full() -> None:
            r = await bridge.run("probe", {input_name: x}, PAGE_TIMEOUT_S)
            kernels.append(r.kernel_ms)

        out: dict[str, Any] = {
            "text_ping_ms": await timed(n, warmup, ping),
            "frame_in_error_out_ms": await timed(n, warmup, frame_in),
        }
        cdp = proc if isinstance(proc, BareChromium) and proc.domains else None
        if cdp is not None:
            await cdp.settle()  # events of the earlier probes lag behind under load
        before = (cdp.cdp_bytes, cdp.cdp_events) if cdp is not None else (0, 0)
        out["full_run_ms"] = await timed(n, warmup, full)
        out["kernel_ms"] = summarize(kernels[warmup:])
        if cdp is not None:
            await cdp.settle()
            runs = n + warmup
            out["cdp_bytes_per_run"] = (cdp.cdp_bytes - before[0]) / runs
            out["cdp_events_per_run"] = (cdp.cdp_events - before[1]) / runs
        return out
    finally:
        await bridge.close()
        if proc is not None:
            await proc.close()
        server.close()


class EchoPage:
    """The shard page as the worker launches it, used only to echo frames: the floor of a page round trip
    (the same WebSocket bridge, a page that does nothing with what it is sent)."""

    def __init__(self, browser: str, platform: str = "wasm") -> None:
        self.browser = browser
        self.platform = platform
        self._server: StaticServer | None = None
        self._bridge: Bridge | None = None
        self._proc: BrowserProcess | None = None

    async def __aenter__(self) -> EchoPage:
        ort_dir = find_ort_dist()
        if ort_dir is None:
            raise RuntimeError("onnxruntime-web is not installed (npm ci)")
        try:
            self._server = StaticServer(ort_dir, Path(tempfile.mkdtemp(prefix="xshard-echo-"))).start()
            self._bridge = await Bridge().start()
            url = (
                f"http://127.0.0.1:{self._server.port}/#ws={self._bridge.port}&token={self._bridge.token}"
                f"&platform={self.platform}&threads=1"
            )
            self._proc = await BrowserProcess(self.browser, url).launch()
            await self._bridge.wait_hello(PAGE_TIMEOUT_S)
            await self._proc.detach_devtools()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sample(self, tensors: dict[str, np.ndarray]) -> float:
        """One echo round trip of ``tensors``, in ms."""
        assert self._bridge is not None
        t0 = time.perf_counter()
        await self._bridge.echo(tensors, PAGE_TIMEOUT_S)
        return (time.perf_counter() - t0) * 1000.0

    async def close(self) -> None:
        if self._bridge is not None:
            await self._bridge.close()
        if self._proc is not None:
            await self._proc.close()
        if self._server is not None:
            self._server.close()
            shutil.rmtree(self._server.shard_dir, ignore_errors=True)
