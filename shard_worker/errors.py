"""Errors raised by the shard worker.

WorkerError
├── BrowserError          browser missing, failed to launch, or died
│   └── BrowserLost       the browser process exited / disconnected while in use
├── BridgeError           the page bridge failed
│   ├── BridgeClosed      the WebSocket to the page closed
│   ├── BridgeTimeout     the page did not answer within its timeout
│   └── PageError         the page raised (load or kernel error); carries the page's message
│       └── StepFailed    a later step of a page run failed; carries that step's inputs
├── ShardNotLoaded        a job arrived for a stage this worker does not serve
└── ArtifactUnavailable   no holder served a shard file whose bytes match its sha256 (``artifacts``)
"""

from __future__ import annotations

from typing import Any


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


class StepFailed(PageError):
    """Step ``step`` (> 0) of a page run failed after the steps before it ran: ``tensors`` are what it was
    given (the failed stage's inputs), ``steps`` what the ones before it measured."""

    def __init__(self, message: str, step: int, tensors: dict[str, Any], steps: tuple[Any, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.tensors = tensors
        self.steps = steps


class ShardNotLoaded(WorkerError):
    """A job arrived for a stage this worker does not serve."""


class ArtifactUnavailable(WorkerError):
    """No holder of a shard file served it with the right hash (each holder's refusal is in ``reasons``)."""

    def __init__(self, sha256: str, reasons: tuple[str, ...]) -> None:
        why = "; ".join(reasons) or "no holder announced it"
        super().__init__(f"shard file {sha256[:12]} could not be fetched: {why}")
        self.sha256 = sha256
        self.reasons = reasons
