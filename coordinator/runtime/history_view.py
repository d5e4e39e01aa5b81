"""What the history database already knows of a model, as the manager uses it: browser statistics that
steer the allocation and the recommendations, and the prior history merged into the performance history.

Reads only; the history writer (``coordinator.history.writer``) is the one that writes. Without a
``db_path`` the view is empty and every read is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from coordinator.history.store import HistoryError, HistoryStore, merge_history
from coordinator.planning.recommendations import BrowserStat

log = logging.getLogger(__name__)


class HistoryView:
    def __init__(self, db_path: str | None, model_name: str, shard_type: str) -> None:
        self.db_path = db_path
        self.model_name = model_name
        self.shard_type = shard_type
        self.store = HistoryStore(db_path) if db_path else None
        self.stats: list[BrowserStat] = []  # per browser, then per shard of this plan
        self.prior: dict[str, Any] = {}  # the guide's history structure as the database held it

    async def read(self, plan_id: str) -> bool:
        """Read this model's statistics and history; False (and a warning) if there is no readable database."""
        store = self.store
        if store is None:
            return False
        try:
            stats = await asyncio.to_thread(self._overall_stats, store)
            stats += await asyncio.to_thread(
                store.browser_stats, self.model_name, self.shard_type, by_shard=True, plan_id=plan_id
            )
            self.prior = await asyncio.to_thread(store.model_history, self.model_name, plan_id)
        except HistoryError as e:
            log.warning("history in %s unreadable, allocating from the guide table: %s", self.db_path, e)
            return False
        self.stats = stats
        return True

    async def refresh(self) -> None:
        """Re-read the per-browser statistics (after the writer committed new events)."""
        if self.store is None:
            return
        try:
            self.stats = await asyncio.to_thread(self._overall_stats, self.store)
        except HistoryError as e:
            log.info("history stats not refreshed: %s", e)

    def _overall_stats(self, store: HistoryStore) -> list[BrowserStat]:
        """Over all shards, then per kind of shard (attention, vision, ...)."""
        overall = store.browser_stats(self.model_name, self.shard_type)
        return overall + store.browser_stats(self.model_name, self.shard_type, by_kind=True)

    def merged(self, live: dict[str, Any]) -> dict[str, Any]:
        """``live`` counters merged with what the database held (``live`` itself without a database)."""
        return merge_history(self.prior, live) if self.store is not None else live
