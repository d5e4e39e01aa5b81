"""Events: appended to the events stream by workers and coordinators, written to DuckDB by the history
consumer only (``event_id`` makes writing them idempotent). Registered with ``wire`` in ``messages``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import SchemaError, SettingError
from .kinds import FailureKind, RecoveryAction


@dataclass(frozen=True, slots=True)
class ExecutionEvent:
    """One shard execution, successful or not (written by the worker that ran it)."""

    TYPE: ClassVar[str] = "ev.exec"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_index: int
    shard_type: str
    worker_id: str
    browser: str
    platform: str
    adapter: str
    kernel_ms: float
    queue_ms: float
    transfer_ms: float
    bytes_in: int
    bytes_out: int
    attempt: int
    outcome: str  # "success" | "error"
    error: str = ""
    kind: str = ""  # the assignment's kind: history groups by it besides shard_type
    dtype: str = ""  # the shard file's precision, as assigned


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One request as the coordinator saw it end: result or error."""

    TYPE: ClassVar[str] = "ev.request"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_type: str
    num_shards: int
    coordinator_id: str
    latency_ms: float
    kernel_ms: float
    attempts: int
    outcome: str  # "success" | "error" | "dead_letter"
    error: str = ""


@dataclass(frozen=True, slots=True)
class RecoveryEvent:
    """A failure and the rung of the recovery ladder that handled it."""

    TYPE: ClassVar[str] = "ev.recovery"
    event_id: str
    ts_ms: float
    request_id: str
    plan_id: str
    model_name: str
    shard_index: int
    worker_id: str
    browser: str
    platform: str
    failure: FailureKind
    action: RecoveryAction
    success: bool
    duration_ms: float
    error: str = ""

    def __post_init__(self) -> None:  # the wire holds their string values
        object.__setattr__(self, "failure", FailureKind.parse(str(self.failure)))
        try:
            object.__setattr__(self, "action", RecoveryAction.parse(str(self.action)))
        except SettingError as e:
            raise SchemaError(str(e)) from None


@dataclass(frozen=True, slots=True)
class PrecisionEvent:
    """One shard's precision: the one it runs in, and one measured candidate (``dtype="auto"``) or the one
    asked for (``measured`` empty, the figures NaN). Written by the coordinator once its shards are loaded."""

    TYPE: ClassVar[str] = "ev.precision"
    event_id: str
    ts_ms: float
    model_name: str
    plan_id: str
    shard_index: int
    dtype: str  # what the shard runs in
    measured: str  # the candidate these figures are of ("" where the dtype was asked for)
    top1: float  # next-token top-1 agreement with all-float32 on the calibration set (NaN: no logits)
    max_diff: float
    relative_diff: float
    positions: int
    reason: str
