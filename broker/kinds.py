"""The closed vocabularies that cross process boundaries: execution platforms, failure kinds and recovery
actions.

Both are ``StrEnum``s: they travel on the wire as their plain string values (msgpack, Redis hashes) and
compare equal to them, so a message decoded from an older writer still matches.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import SettingError


class Platform(StrEnum):
    """Where a shard's kernels run in the page. ``AUTO`` lets the page choose (WebNN, then a hardware
    WebGPU adapter, else WASM) and say what it fell back to."""

    AUTO = "auto"
    WASM = "wasm"
    WEBGPU = "webgpu"
    WEBNN = "webnn"

    @classmethod
    def parse(cls, value: str) -> Platform:
        try:
            return cls(value)
        except ValueError:
            raise SettingError(f"platform must be one of {', '.join(p.value for p in cls)}, got {value!r}") from None


PLATFORMS: tuple[str, ...] = tuple(p.value for p in Platform)


class FailureKind(StrEnum):
    """Why a stage did not run: what a worker reports in a ``StageFailure`` or the monitor finds."""

    KERNEL = "kernel"  # the page threw inside onnxruntime-web
    BROWSER_LOST = "browser-lost"  # the browser died or its bridge closed mid-job
    WORKER_LOST = "worker-lost"  # the worker's heartbeat lapsed (killed, frozen, cut off)
    TIMEOUT = "timeout"  # the kernel or the job took longer than allowed
    INPUT = "input"  # the job's tensors do not fit the shard: never retried
    UNAVAILABLE = "unavailable"  # the worker cannot serve the stage (not loaded, released)
    OUT_OF_MEMORY = "out-of-memory"  # the page could not hold the shard (load or run): never on a page as small

    @classmethod
    def parse(cls, value: str) -> FailureKind:
        """The kind for a wire value; an unknown one (a newer worker) is ``UNAVAILABLE``."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNAVAILABLE


FAILURE_KINDS: tuple[FailureKind, ...] = tuple(FailureKind)


class RecoveryAction(StrEnum):
    """What recovery did about a failure (``RecoveryEvent.action``): a rung of the request ladder
    (``coordinator.recovery.ladder.Rung``), or what a generation session did (``recovery.session``)."""

    RETRY = "retry"
    RESTART = "restart"
    REROUTE = "reroute"
    CHANGE_PLATFORM = "change_platform"
    REDISTRIBUTE = "redistribute"
    DEAD_LETTER = "dead_letter"
    RESTORE = "restore"  # a session's cache rebuilt from its copy (the worker's, or Redis') in a new page
    REPLAY = "replay"  # a session's cache rebuilt by running its token history again
    FAIL = "fail"  # a session step given up: the generation ends with an error

    @classmethod
    def parse(cls, value: str) -> RecoveryAction:
        try:
            return cls(value)
        except ValueError:
            raise SettingError(f"unknown recovery action {value!r}") from None
