"""``python -m benchmarks.cdp_free_worker --redis URL ...``: the stock shard worker (same arguments as
``python -m shard_worker``), except that Chromium gets no Playwright CDP client.

An experiment for ``benchmarks.hop_overhead``: it measures what the chain would cost if the worker did
not attach Playwright (whose CDP session enables the DevTools Network domain, so every binary WebSocket
frame between worker and page is also base64-encoded and pushed over CDP). The browser's exit is still
noticed by the process watcher, and a dead page by the bridge closing.
"""

from __future__ import annotations

import asyncio
import sys

from shard_worker import browser


async def _no_cdp_client(self: browser.BrowserProcess) -> None:
    asyncio.get_running_loop().create_task(self._drain_stderr())


def main(argv: list[str] | None = None) -> int:
    browser.BrowserProcess._attach_playwright = _no_cdp_client  # type: ignore[method-assign]
    from shard_worker.__main__ import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    sys.exit(main())
