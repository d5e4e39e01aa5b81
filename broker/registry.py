"""The worker registry record: what a worker writes when it registers and heartbeats, and the one state
machine of its lifecycle. Written and read only through ``WorkerInfo`` (``Broker.register_worker``,
``Broker.heartbeat``, ``Broker.live_workers``), never as a dict with string keys.

Worker states::

    STARTING ──> READY <──> RESTARTING
        │          │            │
        └──────────┴────────────┴──> STOPPING

``transition(current, target)`` is the only way to move and refuses any other move.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import IllegalTransition, SchemaError
from .kinds import Platform


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"


_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING}),
    WorkerState.READY: frozenset({WorkerState.RESTARTING, WorkerState.STOPPING}),
    WorkerState.RESTARTING: frozenset({WorkerState.READY, WorkerState.STOPPING}),
    WorkerState.STOPPING: frozenset(),
}


def transition(current: WorkerState, target: WorkerState) -> WorkerState:
    """``target`` if the move is legal, else ``IllegalTransition``."""
    if target not in _MOVES[current]:
        raise IllegalTransition("worker", current.value, target.value)
    return target


_JSON_FIELDS = ("capabilities", "stages")


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker's registration (``xshard:{ns}:worker:{id}``) as of its last heartbeat."""

    worker_id: str
    browser: str
    platform: str  # as asked on the command line: auto, wasm, webgpu, webnn
    execution_provider: str  # what the page picked for it
    adapter: str
    user_agent: str
    host: str
    pid: int
    browser_pid: int
    started_ms: int
    heartbeat_ms: int = 0
    state: WorkerState = WorkerState.STARTING
    stages: tuple[str, ...] = ()  # stage streams served
    capabilities: Mapping[str, Any] = field(default_factory=dict)  # the page's probe: webgpu, webnn, wasm
    platform_note: str = ""  # what ``auto`` fell back to, and why
    page_budget_bytes: int = 0  # what the page can hold (its wasm memory ceiling, capped by settings); 0: unknown

    def platforms(self) -> tuple[str, ...]:
        """Execution providers this worker's page offers (WASM always)."""
        caps = self.capabilities or {}
        out = [Platform.WASM.value]
        for p in (Platform.WEBGPU, Platform.WEBNN):
            if (caps.get(p.value) or {}).get("available"):
                out.append(p.value)
        return tuple(out)

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields: strings, JSON for the structured ones."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "worker_id":
                continue
            if f.name in _JSON_FIELDS:
                out[f.name] = json.dumps(list(value) if f.name == "stages" else dict(value))
            else:
                out[f.name] = str(value.value if isinstance(value, StrEnum) else value)
        return out

    @classmethod
    def from_fields(cls, worker_id: str, row: Mapping[Any, Any]) -> WorkerInfo:
        """Decode a registration hash; unknown fields are ignored, missing required ones are a SchemaError."""
        raw = {_text(k): _text(v) for k, v in row.items()}
        kwargs: dict[str, Any] = {"worker_id": worker_id}
        for f in dataclasses.fields(cls):
            if f.name == "worker_id":
                continue
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise SchemaError(f"worker {worker_id} registration lacks field {f.name!r}")
                continue
            kwargs[f.name] = _parse(f.name, raw[f.name], worker_id)
        return cls(**kwargs)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _parse(name: str, value: str, worker_id: str) -> Any:
    try:
        if name in ("pid", "browser_pid", "started_ms", "heartbeat_ms", "page_budget_bytes"):
            return int(float(value))
        if name == "state":
            return WorkerState(value)
        if name == "stages":
            return tuple(json.loads(value))
        if name == "capabilities":
            caps = json.loads(value)
            return caps if isinstance(caps, dict) else {}
    except ValueError as e:
        raise SchemaError(f"worker {worker_id} registration field {name}={value!r}: {e}") from e
    return value


@dataclass(frozen=True, slots=True)
class Connected:
    """Which workers hold a connection to the broker right now (``Broker.connected_workers``), and the
    server's run id: a restarted server has dropped every connection, so absence then says nothing."""

    worker_ids: frozenset[str]
    run_id: str
