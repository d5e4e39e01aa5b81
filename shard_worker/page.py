"""One browser showing the shard page, with its bridge: launch, load shards, run, restart.

``lost`` is set the moment the browser exits or disconnects or the bridge closes; the worker then
restarts the page and reloads its shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from broker.kinds import FailureKind
from broker.shardfiles import data_files

from .bridge import Bridge, RunResult, Step
from .browser import BrowserProcess
from .errors import BrowserError, WorkerError
from .memory import lost_to_oom_killer, oom_kills
from .server import StaticServer
from .settings import WorkerSettings
from .stage import Stage

log = logging.getLogger(__name__)


class Page:
    def __init__(self, settings: WorkerSettings, server: StaticServer) -> None:
        self.settings = settings
        self.server = server
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.oom_kills_at_launch: int | None = None
        self.capabilities: dict[str, Any] = {}
        self.choice: dict[str, Any] = {}
        self.loaded: dict[str, dict[str, Any]] = {}  # session key -> load info
        self._bridge: Bridge | None = None
        self._browser: BrowserProcess | None = None
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def browser_pid(self) -> int | None:
        return self._browser.pid if self._browser else None

    @property
    def user_agent(self) -> str:
        return str(self.capabilities.get("userAgent", ""))

    async def launch(self) -> Page:
        s = self.settings
        self.oom_kills_at_launch = oom_kills()
        self._bridge = await Bridge().start()
        url = (
            f"http://127.0.0.1:{self.server.port}/#ws={self._bridge.port}&token={self._bridge.token}"
            f"&platform={s.platform}&threads={s.wasm_threads}&faults={int(s.allow_fault_injection)}"
        )
        try:
            self._browser = await BrowserProcess(s.browser, url).launch()
            hello = asyncio.ensure_future(self._bridge.wait_hello(s.launch_timeout_s))
            died = asyncio.ensure_future(self._browser.lost.wait())
            await asyncio.wait({hello, died}, return_when=asyncio.FIRST_COMPLETED)
            died.cancel()
            if not hello.done():
                hello.cancel()
                raise BrowserError(f"{s.browser} died before its page connected: {self._browser.lost_reason}")
            self.capabilities = hello.result()
            await self._browser.detach_devtools()
        except BaseException:
            await self.close()
            raise
        self.choice = self._bridge.choice
        if "error" in self.choice:
            await self.close()
            raise WorkerError(f"{s.browser} cannot run platform {s.platform}: {self.choice['error']}")
        self._watchers = [
            asyncio.ensure_future(self._watch(self._browser.lost, lambda: self._browser.lost_reason)),  # type: ignore[union-attr]
            asyncio.ensure_future(self._watch(self._bridge.closed, lambda: self._bridge.close_reason)),  # type: ignore[union-attr]
        ]
        return self

    async def _watch(self, event: asyncio.Event, reason: Any) -> None:
        await event.wait()
        if not self.lost.is_set():
            self.lost_reason = reason()
            self.lost.set()

    async def close(self) -> None:
        for t in self._watchers:
            t.cancel()
        if self._bridge is not None:
            await self._bridge.close()
        if self._browser is not None:
            await self._browser.close()

    def _live_bridge(self) -> Bridge:
        if self._bridge is None:
            raise WorkerError("page not launched")
        return self._bridge

    async def load(self, key: str, stage: Stage, platform: str) -> dict[str, Any]:
        """Create the session of ``stage``'s shard on ``platform`` (auto: the page picks among the stage's
        providers); what the page picked, and which nodes onnxruntime placed on its CPU provider."""
        sha = stage.onnx_sha256
        external = [{"path": f.path, "url": f"/shards/{f.path}"} for f in data_files(self.server.shard_dir, sha)]
        info: dict[str, Any] = await self._live_bridge().request(
            "load",
            self.settings.load_timeout_s,
            key=key,
            url=f"/shards/{sha}.onnx",
            platform=platform,
            external=external,
            providers=list(stage.providers),
            dtype=stage.dtype,
        )
        self.loaded[key] = info
        return info

    def lost_cause(self) -> tuple[FailureKind, str]:
        """Why this page is gone, as a failure kind: out of memory when the kernel's OOM killer killed a process
        since it started (``memory.lost_to_oom_killer``), else a lost browser; with what is known of it."""
        before, now = self.oom_kills_at_launch, oom_kills()
        if before is not None and now is not None and lost_to_oom_killer(before, now):
            why = f"the kernel's OOM killer killed {now - before} process(es) since it started"
            return FailureKind.OUT_OF_MEMORY, f"{why}; {self.lost_reason or 'bridge closed'}"
        return FailureKind.BROWSER_LOST, self.lost_reason or "bridge closed"

    async def release(self, key: str) -> None:
        if self.loaded.pop(key, None) is not None:
            with contextlib.suppress(WorkerError):
                await self._live_bridge().request("release", self.settings.load_timeout_s, key=key)

    async def run(self, key: str, feeds: dict[str, np.ndarray], fail: str | None = None) -> RunResult:
        """Run a loaded session; ``fail`` (an injected fault) reaches the page only with fault injection on."""
        return await self.run_steps((Step(key, None, fail),), feeds)

    async def run_steps(self, steps: Sequence[Step], feeds: dict[str, np.ndarray]) -> RunResult:
        """Run loaded sessions one after another in the page (``Bridge.run_steps``); injected faults reach
        the page only with fault injection on."""
        if not self.settings.allow_fault_injection and any(s.fail for s in steps):
            log.error("refusing to inject a kernel error into %s: fault injection is disabled", steps[0].key)
            steps = [dataclasses.replace(s, fail=None) for s in steps]
        return await self._live_bridge().run_steps(steps, feeds, self.settings.run_timeout_s)

    async def run_session(
        self, steps: Sequence[Step], feeds: dict[str, np.ndarray], session: dict[str, Any]
    ) -> RunResult:
        """Run one step of a generation session: each step's KV cache is fed and kept in the page
        (``web/kvcache.js``); ``session`` is {id, fresh, limit, ttl_ms}."""
        bridge = self._live_bridge()
        return await bridge.run_steps(steps, feeds, self.settings.run_timeout_s, session=session)

    async def end_session(self, session_id: str) -> bool:
        """Free a session's KV cache in the page; False when the page did not hold it."""
        return bool(await self._live_bridge().request("end_session", self.settings.load_timeout_s, session=session_id))

    async def session_count(self) -> int:
        """How many sessions' caches the page holds now."""
        return int(await self._live_bridge().request("sessions", self.settings.load_timeout_s))
