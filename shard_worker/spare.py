"""A warm spare browser (``WorkerSettings.warm_spare``): a second page launched ahead of need, with the
worker's shards loaded into it too, so a lost browser is replaced by one already up and holding them
(measured: loading a 10 MB shard into a fresh page took 5-6 s at load 15, the rest of a restart 0.2 s).

``refill()`` launches the next spare in the background; ``sync(stages)`` (every heartbeat) loads the
stages it lacks into it in the background; ``take()`` hands the spare over once that is done, if it is
up and alive (None otherwise). A spare that fails to launch, to load or dies is dropped and logged; the
worker then launches a fresh page as it would without one, and loads what the spare lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from .errors import WorkerError
from .page import Page
from .server import StaticServer
from .settings import WorkerSettings
from .stage import Stage

log = logging.getLogger(__name__)


class SparePage:
    """At most one warm page, launched in the background."""

    def __init__(self, settings: WorkerSettings, server: StaticServer) -> None:
        self.settings = settings
        self.server = server
        self._launch: asyncio.Task[Page] | None = None
        self._loading: asyncio.Task[None] | None = None

    def refill(self) -> None:
        """Launch a spare in the background unless one is up or on its way."""
        if self.settings.warm_spare and self._launch is None:
            self._launch = asyncio.ensure_future(Page(self.settings, self.server).launch())

    def sync(self, stages: Iterable[Stage]) -> None:
        """Load the ``stages`` the spare lacks into it, in the background (one load run at a time)."""
        task = self._launch
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return
        if self._loading is not None and not self._loading.done():
            return
        page = task.result()
        missing = [st for st in stages if st.session_key(st.platform) not in page.loaded]
        if missing and not page.lost.is_set():
            self._loading = asyncio.ensure_future(self._load(page, missing))

    async def _load(self, page: Page, stages: list[Stage]) -> None:
        try:
            for st in stages:
                await page.load(st.session_key(st.platform), st, st.platform)
        except (WorkerError, OSError) as e:
            log.warning("worker %s: loading shards into the warm spare failed: %s", self.settings.worker_id, e)

    async def take(self) -> Page | None:
        """The spare once it is up and done loading (a launch under way is waited for: it started earlier
        than a fresh one would), if it is alive; it is then no longer the spare's to close."""
        task, self._launch = self._launch, None
        loading, self._loading = self._loading, None
        if task is None:
            return None
        try:
            page = await task
            if loading is not None:
                await loading
        except (WorkerError, OSError) as e:
            log.warning("worker %s: the warm spare browser did not start: %s", self.settings.worker_id, e)
            return None
        if page.lost.is_set():
            await page.close()
            return None
        return page

    async def close(self) -> None:
        task, self._launch = self._launch, None
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
            self._loading = None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, WorkerError, OSError):
            await task
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().close()
