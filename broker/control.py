"""Control messages: a coordinator tells a worker to load, release or restart, or to arm a fault (tests); the
worker answers on the coordinator's reply stream. Registered with ``wire`` in ``messages``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Assignment:
    """Tell a worker to load a shard and consume its stage stream."""

    TYPE: ClassVar[str] = "assign"
    assignment_id: str
    plan_id: str
    shard_index: int
    stage_stream: str
    onnx_sha256: str
    input_names: tuple[str, ...]
    carry_names: tuple[str, ...]
    platform: str
    reply_stream: str
    model_name: str = ""
    shard_type: str = "layer"
    kind: str = ""  # what the shard holds (the plan stage's kind: "attention", "vision", ...), copied into its events
    dtype: str = ""  # the shard file's precision ("fp32", "q4", ...), copied into its events
    providers: tuple[str, ...] = ()  # the execution providers that may run it (empty: any); auto picks among them


@dataclass(frozen=True, slots=True)
class Release:
    """Tell a worker to stop serving a stage and drop its session."""

    TYPE: ClassVar[str] = "release"
    stage_stream: str


@dataclass(frozen=True, slots=True)
class Restart:
    """Tell a worker to restart its browser and reload its shards."""

    TYPE: ClassVar[str] = "restart"
    reason: str
    since_ms: float = 0.0  # skip if the browser was (re)started after this time: it already was restarted


@dataclass(frozen=True, slots=True)
class Inject:
    """Fault injection for tests and ``xshard fault-test``: make the page throw in its next ``count`` kernels
    (``kernel-error``). Only a worker started with ``--allow-fault-injection`` accepts it; either way it answers
    with an ``InjectReply`` on ``reply_stream`` (when given), so the sender waits for the fault to be armed."""

    TYPE: ClassVar[str] = "inject"
    kind: str
    count: int
    inject_id: str = ""
    reply_stream: str = ""
    shard_index: int = -1  # only kernels of this shard throw (-1: any shard's)


@dataclass(frozen=True, slots=True)
class InjectReply:
    """A worker's answer to an ``Inject``: armed, or refused and why."""

    TYPE: ClassVar[str] = "inject.reply"
    inject_id: str
    worker_id: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AssignmentReply:
    """A worker's answer to an ``Assignment``."""

    TYPE: ClassVar[str] = "assigned"
    assignment_id: str
    worker_id: str
    ok: bool
    error: str
    execution_provider: str
    adapter: str
    user_agent: str
    load_ms: float
    note: str = ""
    wasm_threads: int = 0  # onnxruntime-web threads of the worker's page (0: not reported)
    nodes: int = 0  # the session's nodes after onnxruntime's optimizations (0: not reported)
    cpu_nodes: int = 0  # of those, the nodes onnxruntime placed on its CPU provider besides the one asked for
    cpu_ops: str = ""  # their op types and counts, most first ("Shape x62, Gather x54"); "" on WASM
