"""Launching one headless browser that opens the shard page.

Chromium is started as a process with a DevTools port, and Playwright attaches to it over CDP
(console forwarding, crash and ``disconnected`` events) until the page is up, then detaches.
Firefox is started as a process with a
fresh profile whose prefs enable WebGPU. Either way the page connects back over the bridge, and
``lost`` is set the moment the browser exits or disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from broker.browsers import find_executable, install_hint
from broker.process import die_with_parent

from .errors import BrowserError

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT_S = 30.0
ATTACH_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--enable-unsafe-webgpu",
    "--enable-unsafe-swiftshader",
    "--use-webgpu-adapter=swiftshader",
    "--enable-features=WebMachineLearningNeuralNetwork",
    "--remote-debugging-port=0",
)

FIREFOX_PREFS = {
    "dom.webgpu.enabled": True,
    "gfx.webgpu.ignore-blocklist": True,
    "gfx.webgpu.force-enabled": True,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "app.update.enabled": False,
    "app.update.auto": False,
    "app.normandy.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "extensions.update.enabled": False,
    "extensions.blocklist.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "services.settings.server": "http://127.0.0.1:9/",
    "media.gmp-manager.updateEnabled": False,
    "browser.newtabpage.enabled": False,
    "browser.tabs.warnOnClose": False,
    "dom.ipc.processCount": 1,
}


async def stop_process_group(proc: asyncio.subprocess.Process, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """SIGTERM a browser's process group, SIGKILL it after ``timeout_s``, and reap it."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class BrowserProcess:
    """One running headless browser showing ``url``."""

    def __init__(self, browser: str, url: str) -> None:
        self.browser = browser
        self.url = url
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._profile = Path(tempfile.mkdtemp(prefix=f"xshard-{browser}-"))
        self._pw: Any = None
        self._cdp: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._detached = False

    async def launch(self) -> BrowserProcess:
        try:
            exe = find_executable(self.browser)
        except ValueError as e:
            raise BrowserError(str(e)) from e
        if exe is None:
            raise BrowserError(install_hint(self.browser))
        if self.browser == "firefox":
            args = [exe, "--headless", "--no-remote", "--profile", str(self._profile), self.url]
            self._write_firefox_prefs()
        else:
            args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}", self.url]
            if os.geteuid() == 0:
                args.insert(1, "--no-sandbox")
        env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", "MOZ_DISABLE_AUTO_SAFE_MODE": "1"}
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=env,
                preexec_fn=die_with_parent,
            )
        except OSError as e:
            raise BrowserError(f"cannot start {self.browser} ({exe}): {e}") from e
        self.pid = self._proc.pid
        log.info("%s pid %s started (%s)", self.browser, self.pid, exe)
        if self.browser != "firefox":
            await self._attach_playwright()
        else:
            asyncio.get_running_loop().create_task(self._drain_stderr())
        self._watch = asyncio.get_running_loop().create_task(self._wait_exit())
        return self

    def _write_firefox_prefs(self) -> None:
        lines = []
        for key, value in FIREFOX_PREFS.items():
            v = ("true" if value else "false") if isinstance(value, bool) else repr(value).replace("'", '"')
            lines.append(f'user_pref("{key}", {v});')
        (self._profile / "user.js").write_text("\n".join(lines) + "\n")

    async def _drain_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        while line := await self._proc.stderr.readline():
            log.debug("%s: %s", self.browser, line.decode(errors="replace").rstrip())

    async def _attach_playwright(self) -> None:
        assert self._proc and self._proc.stderr
        endpoint = None
        try:
            async with asyncio.timeout(LAUNCH_TIMEOUT_S):
                while line := await self._proc.stderr.readline():
                    m = re.search(rb"DevTools listening on (ws://\S+)", line)
                    if m:
                        endpoint = m.group(1).decode()
                        break
        except TimeoutError:
            pass
        if endpoint is None:
            await self.close()
            raise BrowserError(f"{self.browser} did not open its DevTools endpoint within {LAUNCH_TIMEOUT_S}s")
        asyncio.get_running_loop().create_task(self._drain_stderr())
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright

        try:
            self._pw = await async_playwright().start()
            self._cdp = await self._pw.chromium.connect_over_cdp(endpoint, timeout=ATTACH_TIMEOUT_S * 1000)
        except PlaywrightError as e:
            # Playwright only watches the start-up here (it detaches once the page is up); the page, the
            # bridge and the process-exit watch do not need it. Seen: connect_over_cdp hanging under load.
            log.warning(
                "%s: playwright could not attach (%s); continuing without it: crashes are still "
                "noticed by the process exit and the bridge",
                self.browser,
                str(e).splitlines()[0],
            )
            self._cdp = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pw.stop(), CLOSE_TIMEOUT_S)
            self._pw = None
            return
        self._cdp.on("disconnected", self._on_disconnected)
        for context in self._cdp.contexts:
            for page in context.pages:
                page.on("crash", lambda _p: self._mark_lost("page crashed"))
                page.on("console", lambda m: log.debug("%s console %s: %s", self.browser, m.type, m.text))

    def _on_disconnected(self, _browser: Any) -> None:
        if not self._detached:
            self._mark_lost("browser disconnected (playwright)")

    async def detach_devtools(self) -> None:
        """Drop the Playwright connection once the page is up. Playwright tracks the page's network,
        which copies every bridge frame, base64-encoded, over DevTools (measured: a 196 KB hop took
        ~4 ms instead of ~1.3 ms). From here on the process exit and the bridge tell a crash."""
        self._detached = True
        if self._cdp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cdp.close(), CLOSE_TIMEOUT_S)
            self._cdp = None
        if self._pw is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pw.stop(), CLOSE_TIMEOUT_S)
            self._pw = None

    async def _wait_exit(self) -> None:
        assert self._proc
        code = await self._proc.wait()
        self._mark_lost(f"{self.browser} process {self.pid} exited with {code}")

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            if not self._closing:
                log.warning("%s lost: %s", self.browser, reason)

    async def close(self) -> None:
        self._closing = True
        if self._cdp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._cdp.close(), CLOSE_TIMEOUT_S)
        if self._pw is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pw.stop(), CLOSE_TIMEOUT_S)
        if self._proc is not None:
            await stop_process_group(self._proc)
        if self._watch is not None:
            self._watch.cancel()
        shutil.rmtree(self._profile, ignore_errors=True)
