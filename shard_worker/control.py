"""The control stream of one worker (``xshard:{ns}:control:{worker_id}``): assignments, releases,
restarts and injected faults, handled in the order they were sent.

The read position survives a reconnect and moves past an entry only once it is handled, so a broker
outage neither replays commands already carried out nor drops the one being handled (handling one
twice is harmless: an assignment reloads its shard and answers again, an inject re-arms the same count).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import MutableMapping
from typing import Any, Protocol

from broker.errors import SettingError
from broker.keys import STAGE_GROUP
from broker.kinds import Platform
from broker.messages import Assignment, AssignmentReply, Inject, Release, Restart
from broker.streams import Delivery

from .artifacts import WorkerArtifacts
from .errors import ArtifactUnavailable, BridgeClosed, BridgeTimeout, PageError
from .host import WorkerHost
from .injection import FaultInjection
from .stage import Stage

log = logging.getLogger(__name__)

CONTROL_BLOCK_MS = 1000


class ControlHost(WorkerHost, Protocol):
    """What the control stream needs from its worker: it also adds and removes the stages served."""

    @property
    def stages(self) -> MutableMapping[str, Stage]: ...
    @property
    def faults(self) -> FaultInjection: ...
    @property
    def artifacts(self) -> WorkerArtifacts: ...
    async def wait_ready(self) -> None: ...
    def restart_unless_since(self, since_ms: float, reason: str) -> bool: ...


class ControlReader:
    """Reads and carries out one worker's control stream."""

    def __init__(self, host: ControlHost) -> None:
        self.host = host
        self._last_id = "0"

    async def read_until_stopped(self, stop: asyncio.Event) -> None:
        stream = self.host.broker.keys.control(self.host.id)
        while not stop.is_set():
            for d in await self.host.broker.read(stream, self._last_id, block_ms=CONTROL_BLOCK_MS):
                await self.handle(d)
                self._last_id = d.entry_id

    async def handle(self, d: Delivery) -> None:
        h, msg = self.host, d.message
        if isinstance(msg, Assignment):
            await h.broker.add(msg.reply_stream, await self._assign(msg))
        elif isinstance(msg, Release):
            await self._release(msg.stage_stream)
        elif isinstance(msg, Restart):
            if not h.restart_unless_since(msg.since_ms, f"asked to: {msg.reason}"):
                log.info("worker %s: browser already restarted since the failure; %s", h.id, msg.reason)
        elif isinstance(msg, Inject):
            reply = h.faults.arm(msg)
            if msg.reply_stream:
                await h.broker.add(msg.reply_stream, reply)
        else:
            log.error("worker %s: ignoring control entry %s: %s", h.id, d.entry_id, d.error or msg)

    async def _assign(self, a: Assignment) -> AssignmentReply:
        """Load the assigned shard into the page and serve its stage stream; the reply says how it went."""
        h = self.host
        await h.wait_ready()
        try:  # a shard file this worker lacks is fetched by hash from a holder, verified
            await h.artifacts.ensure(a.onnx_sha256)
        except (ArtifactUnavailable, SettingError) as e:
            return self._refused(a, f"shard {a.shard_index}: {e}")
        try:
            platform = h.settings.platform if a.platform == Platform.AUTO else Platform.parse(a.platform)
        except SettingError as e:
            return self._refused(a, f"loading shard {a.shard_index} failed: {e}")
        fields = (a.input_names, a.carry_names, platform, a.model_name, a.shard_type)
        stage = Stage(
            a.stage_stream, a.shard_index, a.onnx_sha256, *fields, kind=a.kind, dtype=a.dtype, providers=a.providers
        )
        try:
            info: dict[str, Any] = await h.page.load(stage.session_key(platform), stage, platform)
            await h.broker.ensure_group(a.stage_stream, STAGE_GROUP)
            await h.broker.ensure_group(h.broker.keys.direct(h.id), STAGE_GROUP)
        except (PageError, BridgeTimeout, BridgeClosed) as e:
            return self._refused(a, f"loading shard {a.shard_index} failed: {e}")
        h.stages[a.stage_stream] = dataclasses.replace(stage, provider=info["provider"])
        log.info(
            "worker %s serves shard %d of %s with %s (%.0f ms to load)",
            h.id,
            a.shard_index,
            a.plan_id,
            info["provider"],
            info["load_ms"],
        )
        return AssignmentReply(
            assignment_id=a.assignment_id,
            worker_id=h.id,
            ok=True,
            error="",
            execution_provider=info["provider"],
            adapter=info["adapter"],
            user_agent=h.page.user_agent,
            load_ms=float(info["load_ms"]),
            note=info.get("note") or "",
            wasm_threads=int(h.page.capabilities.get("wasm", {}).get("threads", 0)),
            nodes=int(info.get("nodes") or 0),
            cpu_nodes=int(info.get("cpu_nodes") or 0),
            cpu_ops=str(info.get("cpu_ops") or ""),
        )

    def _refused(self, a: Assignment, error: str) -> AssignmentReply:
        h = self.host
        return AssignmentReply(a.assignment_id, h.id, False, error, "", "", h.page.user_agent, 0.0)

    async def _release(self, stream: str) -> None:
        h = self.host
        if h.stages.pop(stream, None) is not None:
            for key in [k for k in h.page.loaded if k.startswith(f"{stream}|")]:
                with contextlib.suppress(PageError, BridgeTimeout, BridgeClosed):
                    await h.page.release(key)
