"""``ModelShardingManager``: the public API, as the guide shows it, on real browsers and Redis Streams.

Without ``redis_url`` (and no ``REDIS_URL`` in the environment) the manager starts an embedded
valkey-server and one local worker process per shard. With it, it uses the workers registered there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from broker.browsers import find_executable, install_hint
from broker.embedded import EmbeddedValkey
from broker.errors import BrokerError
from broker.messages import Assignment, AssignmentReply, RequestEvent, ShardFailure, ShardJob, ShardResult
from broker.streams import Broker

from .allocation import Slot, allocate
from .dispatch import Dispatcher
from .errors import AllocationError, InputError, XshardError
from .launcher import LocalWorkers
from .metrics import LiveMetrics
from .models import ResolvedModel, resolve_model
from .settings import ManagerSettings
from .shardset import ShardSet, build_shard_set
from .validation import validate_inputs

log = logging.getLogger(__name__)

FAULT_TOLERANCE_LEVELS = ("none", "low", "medium", "high", "critical")
RECOVERY_STRATEGIES = ("restart", "reconnect", "failover", "progressive", "parallel")

Progress = Callable[[str], None]


def now_ms() -> int:
    return int(time.time() * 1000)


def _match_browsers(slots: Mapping[int, Slot], live: list[dict[str, Any]]) -> dict[int, str] | None:
    """Distinct live workers of each shard's browser, or None if some shard has none free."""
    free = list(live)
    out = {}
    for i, slot in slots.items():
        w = next((w for w in free if w.get("browser") == slot.browser), None)
        if w is None:
            return None
        free.remove(w)
        out[i] = w["worker_id"]
    return out


class ModelShardingManager:
    """Shards a model across browsers and runs inference through the shards."""

    def __init__(
        self,
        model_name: str,
        num_shards: int = 2,
        shard_type: str = "layer",
        model_type: str = "text",
        enable_ipfs: bool = True,
        max_connections: int = 4,
        db_path: str | None = None,
        fault_tolerance_level: str = "medium",
        recovery_strategy: str = "progressive",
        custom_browser_allocation: Mapping[int, Mapping[str, Any]] | None = None,
        *,
        redis_url: str | None = None,
        browsers: Sequence[str] | None = None,
        platform: str = "auto",
        settings: ManagerSettings | None = None,
        progress: Progress | None = None,
    ) -> None:
        if fault_tolerance_level not in FAULT_TOLERANCE_LEVELS:
            raise ValueError(f"fault_tolerance_level must be one of {FAULT_TOLERANCE_LEVELS}")
        if recovery_strategy not in RECOVERY_STRATEGIES:
            raise ValueError(f"recovery_strategy must be one of {RECOVERY_STRATEGIES}")
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.model_name = model_name
        self.num_shards = num_shards
        self.shard_type = shard_type
        self.model_type = model_type
        self.enable_ipfs = enable_ipfs  # content addressing is by sha256; IPFS fetching is not implemented
        self.max_connections = max_connections
        self.db_path = db_path
        self.fault_tolerance_level = fault_tolerance_level
        self.recovery_strategy = recovery_strategy
        self.custom_browser_allocation = dict(custom_browser_allocation or {})
        self.redis_url = redis_url if redis_url is not None else os.environ.get("REDIS_URL") or None
        self.browsers = list(browsers) if browsers else None
        self.platform = platform
        self.settings = settings or ManagerSettings.from_env()
        self.coordinator_id = f"coord-{uuid.uuid4().hex[:10]}"
        self.last_error: str | None = None
        self.initialized = False
        self.model: ResolvedModel | None = None
        self.shards: ShardSet | None = None
        self.allocation: dict[int, dict[str, Any]] = {}
        self.metrics = LiveMetrics(shard_type)
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._embedded: EmbeddedValkey | None = None
        self._broker: Broker | None = None
        self._dispatcher: Dispatcher | None = None
        self._local: LocalWorkers | None = None
        self._route: tuple[str, ...] = ()
        self._assigned: dict[str, list[str]] = {}  # worker_id -> stage streams
        self._slots: dict[int, Slot] = {}
        self._emitting: set[asyncio.Task[None]] = set()

    @property
    def broker_url(self) -> str | None:
        """The broker in use (the embedded one's URL when no ``redis_url`` was given)."""
        return self._broker.url if self._broker else None

    @property
    def route(self) -> tuple[str, ...]:
        """Stage stream names of this manager's plan, in order."""
        return self._route

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> ModelShardingManager:
        if not await self.initialize_sharding():
            await self.close()
            raise XshardError(self.last_error or "initialize_sharding failed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def prepare(self) -> ShardSet:
        """Resolve and cut the model and choose browsers, without a broker or a browser.

        Idempotent; ``initialize_sharding`` calls it. Raises ModelError, PlanError, AllocationError.
        """
        if self.shards is not None:
            return self.shards
        s = self.settings
        self._progress(f"resolving model {self.model_name}")
        self.model = await asyncio.to_thread(resolve_model, self.model_name, s.cache_dir, self._progress)
        self._progress(f"cutting {self.model_name} into {self.num_shards} {self.shard_type} shards")
        shards = await asyncio.to_thread(
            build_shard_set,
            self.model.onnx_path,
            self.num_shards,
            self.shard_type,
            s.cache_dir,
            s.weight_share,
        )
        self._slots = allocate(
            self.num_shards, model_type=self.model_type, model_kind=self.model.kind,
            installed=lambda b: find_executable(b) is not None, platform=self.platform, browsers=self.browsers,
            custom=self.custom_browser_allocation,
        )  # fmt: skip
        self.shards = shards
        return shards

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs as the model's arrays, or InputError; needs ``prepare()`` first."""
        if self.shards is None:
            raise XshardError("call prepare() or initialize_sharding() first")
        return validate_inputs(inputs, self.shards.profile.inputs, self.shards.profile.vocab_limits)

    async def initialize_sharding(self) -> bool:
        """Prepare the model, connect the broker, start or find workers, load the shards."""
        try:
            await self.prepare()
            await self._start()
        except (XshardError, BrokerError, ValueError, OSError) as e:
            self.last_error = str(e)
            log.info("initialize_sharding failed: %s", e)
            return False
        self.initialized = True
        return True

    async def _start(self) -> None:
        assert self.shards is not None
        await self._connect()
        assert self._broker is not None
        plan = self.shards.plan
        self._route = tuple(self._broker.keys.stage(plan.plan_id, st.index) for st in plan.stages)
        slots = dict(self._slots)
        workers = await (self._start_local_workers(slots) if self.redis_url is None else self._find_workers(slots))
        await self._assign(slots, workers)

    async def _connect(self) -> None:
        s = self.settings
        if self.redis_url is None:
            self._progress("starting the embedded valkey broker")
            self._embedded = await EmbeddedValkey().__aenter__()
            url = self._embedded.url
        else:
            url = self.redis_url
        self._broker = Broker(url, s.namespace)
        await self._broker.ping()
        self._dispatcher = Dispatcher(self._broker, self.coordinator_id)
        await self._dispatcher.start()

    async def _start_local_workers(self, slots: dict[int, Slot]) -> dict[int, list[str]]:
        assert self._broker is not None
        for slot in slots.values():
            if find_executable(slot.browser) is None:
                raise AllocationError(install_hint(slot.browser))
        s = self.settings
        self._local = LocalWorkers(self._broker.url, s.namespace, s.cache_dir, s.heartbeat_s)
        chosen = {i: self._local.spawn(slot.browser, slot.platform).worker_id for i, slot in slots.items()}
        names = ", ".join(f"{slot.browser}" for slot in slots.values())
        self._progress(f"launching {len(chosen)} headless browsers ({names})")
        await self._local.wait_registered(self._broker, list(chosen.values()), s.worker_wait_s,
                                          s.heartbeat_max_age_ms)  # fmt: skip
        return {i: [wid] for i, wid in chosen.items()}

    async def _find_workers(self, slots: dict[int, Slot]) -> dict[int, list[str]]:
        """Map shards to registered workers: a matching browser first; extra workers scale out.

        Waits until every shard has a free worker of its browser, or (once there are enough workers
        of any browser) ``browser_match_wait_s`` more, then takes other browsers and says so.
        """
        assert self._broker is not None
        s = self.settings
        deadline = time.monotonic() + s.worker_wait_s
        enough_since: float | None = None
        self._progress(f"waiting for {self.num_shards} workers on {self.redis_url}")
        while True:
            live = sorted(
                await self._broker.live_workers(now_ms(), s.heartbeat_max_age_ms),
                key=lambda w: w["worker_id"],
            )
            matched = _match_browsers(slots, live)
            if len(live) >= self.num_shards:
                enough_since = enough_since or time.monotonic()
                if matched is not None or time.monotonic() - enough_since > s.browser_match_wait_s:
                    break
            if time.monotonic() > deadline:
                have = ", ".join(f"{w['worker_id']} ({w.get('browser')})" for w in live) or "none"
                raise AllocationError(
                    f"{self.num_shards} shards need {self.num_shards} workers; {len(live)} registered on "
                    f"{self.redis_url} (namespace {s.namespace}) within {s.worker_wait_s}s: {have}"
                )
            await asyncio.sleep(0.2)
        free = list(live)
        chosen: dict[int, list[str]] = {}
        for i, slot in slots.items():
            match = next((w for w in free if w.get("browser") == slot.browser), None)
            if match is None:
                match = free[0]
                why = f"{slot.reason}; no free {slot.browser} worker registered, used {match['browser']}"
                slots[i] = Slot(match["browser"], slot.platform, slot.specialization, why)
            free.remove(match)
            chosen[i] = [match["worker_id"]]
        for k, extra in enumerate(free):
            chosen[k % self.num_shards].append(extra["worker_id"])
        return chosen

    async def _assign(self, slots: dict[int, Slot], workers: dict[int, list[str]]) -> None:
        assert self._broker and self._dispatcher and self.shards
        plan, s = self.shards.plan, self.settings
        futures: dict[tuple[int, str], asyncio.Future[AssignmentReply]] = {}
        for st in plan.stages:
            for wid in workers[st.index]:
                a = Assignment(
                    assignment_id=uuid.uuid4().hex, plan_id=plan.plan_id, shard_index=st.index,
                    stage_stream=self._route[st.index], onnx_sha256=self.shards.shard_sha256[st.index],
                    input_names=st.input_names, carry_names=st.carry_names, platform=slots[st.index].platform,
                    reply_stream=self._dispatcher.reply_stream, model_name=self.model_name,
                    shard_type=self.shard_type,
                )  # fmt: skip
                futures[(st.index, wid)] = await self._dispatcher.assign(wid, a)
                self._assigned.setdefault(wid, []).append(a.stage_stream)
        self._progress(f"loading {len(futures)} shard sessions in the browsers")
        try:
            async with asyncio.timeout(s.assign_timeout_s):
                replies = {k: await f for k, f in futures.items()}
        except TimeoutError as e:
            raise AllocationError(f"workers did not load their shards within {s.assign_timeout_s}s") from e
        failed = [f"shard {i} on {wid}: {r.error}" for (i, wid), r in replies.items() if not r.ok]
        if failed:
            raise AllocationError("loading shards failed: " + "; ".join(failed))
        for (i, wid), r in sorted(replies.items()):
            slot = slots[i]
            entry = {
                **slot.as_dict(), "worker_id": wid, "execution_provider": r.execution_provider,
                "adapter": r.adapter, "user_agent": r.user_agent, "load_ms": round(r.load_ms, 1),
                "requested_platform": slot.platform, "platform": r.execution_provider, "platform_note": r.note,
            }  # fmt: skip
            if i in self.allocation:
                self.allocation[i].setdefault("replicas", []).append(entry)
            else:
                self.allocation[i] = entry

    async def close(self) -> None:
        """Release shard sessions, stop local workers and the embedded broker."""
        if self._emitting:
            await asyncio.gather(*self._emitting, return_exceptions=True)
        if self._dispatcher is not None:
            await self._dispatcher.close()
        if self._local is not None:
            await self._local.stop_all()
        elif self._broker is not None and self._assigned:
            from broker.messages import Release

            for wid, streams in self._assigned.items():
                for stream in streams:
                    try:
                        await self._broker.add(self._broker.keys.control(wid), Release(stream))
                    except BrokerError as e:
                        log.warning("could not release %s on %s: %s", stream, wid, e)
        if self._broker is not None:
            try:
                await self._broker.delete(self._broker.keys.reply(self.coordinator_id))
            except BrokerError:
                pass
            await self._broker.close()
        if self._embedded is not None:
            await self._embedded.__aexit__(None, None, None)
        self._broker = self._dispatcher = self._local = self._embedded = None
        self.initialized = False

    # -- inference ---------------------------------------------------------------------------

    async def run_inference_sharded(self, inputs: Mapping[str, Any], max_retries: int = 2) -> dict[str, Any]:
        """Run one request through the shards; ``{"result", "metrics"}`` or ``{"error"}``."""
        if not self.initialized or self.shards is None or self._dispatcher is None:
            return {"error": "the manager is not initialized: call initialize_sharding() first",
                    "error_kind": "state"}  # fmt: skip
        try:
            arrays = self.check_inputs(inputs)
        except InputError as e:
            return {"error": str(e), "error_kind": "input"}
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        last_error, error_kind = "", "failed"
        attempts = 0
        for attempt in range(1, max(0, max_retries) + 2):
            attempts = attempt
            job = ShardJob(
                request_id=request_id, plan_id=self.shards.plan.plan_id, stage_index=0, route=self._route,
                reply_stream=self._dispatcher.reply_stream, tensors=arrays, enqueued_ms=time.time() * 1000.0,
                attempt=attempt,
            )  # fmt: skip
            try:
                fut = await self._dispatcher.submit(job)
                reply = await asyncio.wait_for(fut, self.settings.request_timeout_s)
            except TimeoutError:
                self._dispatcher.forget(request_id)
                last_error = f"request {request_id} timed out after {self.settings.request_timeout_s}s"
                error_kind = "timeout"
                break
            except BrokerError as e:
                last_error = f"request {request_id}: {e}"
                break
            if isinstance(reply, ShardResult):
                return self._success(request_id, reply, started, attempts)
            assert isinstance(reply, ShardFailure)
            self._record_traces(reply.trace)
            self._record_failure(reply)
            last_error = f"shard {reply.stage_index} failed on {reply.worker_id} (attempt {attempt}): {reply.error}"
            if reply.kind == "input":
                error_kind = "input"
                break
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.metrics.record_request(request_id, False, latency_ms, last_error)
        self._emit_request(request_id, latency_ms, 0.0, attempts, "error", last_error)
        return {"error": last_error, "error_kind": error_kind, "request_id": request_id, "attempts": attempts}

    def _emit_request(
        self, request_id: str, latency_ms: float, kernel_ms: float, attempts: int, outcome: str, error: str
    ) -> None:
        """Append the request's event to the events stream without delaying the caller."""
        if self._broker is None or self.shards is None:
            return
        event = RequestEvent(
            event_id=uuid.uuid4().hex, ts_ms=time.time() * 1000.0, request_id=request_id,
            plan_id=self.shards.plan.plan_id, model_name=self.model_name, shard_type=self.shard_type,
            num_shards=self.num_shards, coordinator_id=self.coordinator_id, latency_ms=latency_ms,
            kernel_ms=kernel_ms, attempts=attempts, outcome=outcome, error=error,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._emit(event))
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _emit(self, event: RequestEvent) -> None:
        assert self._broker is not None
        try:
            await self._broker.emit(event)
        except BrokerError as e:
            log.warning("request %s: could not append its event: %s", event.request_id, e)

    def _component_id(self, shard_index: int) -> str:
        return f"shard_{shard_index}"

    def _record_traces(self, trace: Sequence[Mapping[str, Any]]) -> None:
        for t in trace:
            info = {"browser": t["browser"], "platform": t["execution_provider"], "shard_type": self.shard_type,
                    "shard_index": t["shard_index"], "worker_id": t["worker_id"]}  # fmt: skip
            self.metrics.record_component(self._component_id(t["shard_index"]), info, True, t["kernel_ms"])

    def _record_failure(self, f: ShardFailure) -> None:
        alloc = self.allocation.get(f.stage_index, {})
        info = {"browser": alloc.get("browser", "unknown"), "platform": alloc.get("platform", "unknown"),
                "shard_type": self.shard_type, "shard_index": f.stage_index, "worker_id": f.worker_id}  # fmt: skip
        self.metrics.record_component(self._component_id(f.stage_index), info, False, None)

    def _success(self, request_id: str, reply: ShardResult, started: float, attempts: int) -> dict[str, Any]:
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._record_traces(reply.trace)
        self.metrics.record_request(request_id, True, latency_ms)
        components = {}
        for t in reply.trace:
            components[self._component_id(t["shard_index"])] = {
                "status": "success", "shard_index": t["shard_index"], "worker_id": t["worker_id"],
                "browser": t["browser"], "user_agent": t["user_agent"],
                "execution_provider": t["execution_provider"], "adapter": t["adapter"],
                "kernel_ms": round(t["kernel_ms"], 3), "queue_ms": round(t["queue_ms"], 3),
                "worker_ms": round(t["worker_ms"], 3), "bytes_in": t["bytes_in"], "bytes_out": t["bytes_out"],
                "attempt": t["attempt"],
            }  # fmt: skip
        kernel_ms = sum(t["kernel_ms"] for t in reply.trace)
        self._emit_request(request_id, latency_ms, kernel_ms, attempts, "success", "")
        return {
            "result": {name: np.array(arr) for name, arr in reply.tensors.items()},
            "metrics": {
                "request_id": request_id,
                "inference_time_ms": round(latency_ms, 3),
                "kernel_time_ms": round(kernel_ms, 3),
                "overhead_ms": round(latency_ms - kernel_ms, 3),
                "component_count": self.num_shards,
                "successful_components": len(components),
                "component_results": components,
                "attempts": attempts,
            },
        }

    # -- reporting ---------------------------------------------------------------------------

    def get_metrics(self) -> dict[str, Any]:
        plan = self.shards.plan if self.shards else None
        return {
            "model_name": self.model_name,
            "model_path": str(self.model.onnx_path) if self.model else None,
            "model_kind": self.model.kind if self.model else None,
            "num_shards": self.num_shards,
            "shard_type": self.shard_type,
            "model_type": self.model_type,
            "initialized": self.initialized,
            "fault_tolerance_level": self.fault_tolerance_level,
            "recovery_strategy": self.recovery_strategy,
            "broker": self._broker.url if self._broker else self.redis_url,
            "embedded_broker": self._embedded is not None,
            "plan_id": plan.plan_id if plan else None,
            "boundary_kind": plan.boundary_kind if plan else None,
            "shards": [
                {
                    "index": st.index,
                    "nodes": [st.start, st.end],
                    "inputs": list(st.input_names),
                    "carries": list(st.carry_names),
                    "weight_bytes": st.weight_bytes,
                    "cost_share": round(st.cost_share, 4),
                    "flops_share": round(st.flops_share, 4),
                    "sha256": self.shards.shard_sha256[st.index] if self.shards else None,
                }
                for st in (plan.stages if plan else ())
            ],  # fmt: skip
            "browser_allocation": {i: dict(v) for i, v in sorted(self.allocation.items())},
            "requests": self.metrics.requests.as_dict(),
        }

    def get_performance_history(self) -> dict[str, Any]:
        return self.metrics.history()
