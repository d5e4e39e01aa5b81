"""A warm spare browser (``WorkerSettings.warm_spare``): a second page launched ahead of need, so a lost
browser is replaced by one already up (its onnxruntime-web initialised) and only the shards are loaded.

``take()`` hands over the spare if it is up and alive (None otherwise); ``refill()`` launches the next
one in the background. A spare that fails to launch or dies is dropped and logged; the worker then
launches a fresh page as it would without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .errors import WorkerError
from .page import Page
from .server import StaticServer
from .settings import WorkerSettings

log = logging.getLogger(__name__)


class SparePage:
    """At most one warm page, launched in the background."""

    def __init__(self, settings: WorkerSettings, server: StaticServer) -> None:
        self.settings = settings
        self.server = server
        self._launch: asyncio.Task[Page] | None = None

    def refill(self) -> None:
        """Launch a spare in the background unless one is up or on its way."""
        if self.settings.warm_spare and self._launch is None:
            self._launch = asyncio.ensure_future(Page(self.settings, self.server).launch())

    async def take(self) -> Page | None:
        """The spare once it is up (a launch under way is waited for: it started earlier than a fresh one
        would), if it is alive; it is then no longer the spare's to close."""
        task, self._launch = self._launch, None
        if task is None:
            return None
        try:
            page = await task
        except (WorkerError, OSError) as e:
            log.warning("worker %s: the warm spare browser did not start: %s", self.settings.worker_id, e)
            return None
        if page.lost.is_set():
            await page.close()
            return None
        return page

    async def close(self) -> None:
        task, self._launch = self._launch, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, WorkerError, OSError):
            await task
        if task.done() and not task.cancelled() and task.exception() is None:
            await task.result().close()
