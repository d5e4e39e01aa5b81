"""Errors raised by the shard worker.

WorkerError
├── BrowserError          browser missing, failed to launch, or died
│   └── BrowserLost       the browser process exited / disconnected while in use
├── BridgeError           the page bridge failed
│   ├── BridgeClosed      the WebSocket to the page closed
│   ├── BridgeTimeout     the page did not answer within its timeout
│   └── PageError         the page raised (load or kernel error); carries the page's message
└── ShardNotLoaded        a job arrived for a stage this worker does not serve
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the shard worker raises."""


class BrowserError(WorkerError):
    """The browser is missing, failed to launch, or died."""


class BrowserLost(BrowserError):
    """The browser exited or disconnected while in use."""


class BridgeError(WorkerError):
    """The bridge to the page failed."""


class BridgeClosed(BridgeError):
    """The WebSocket to the page closed."""


class BridgeTimeout(BridgeError):
    """The page did not answer in time."""


class PageError(BridgeError):
    """The page reported an error (shard load or kernel)."""


class ShardNotLoaded(WorkerError):
    """A job arrived for a stage this worker does not serve."""
