"""``ModelShardingManager``: the public API, as the guide shows it, on real browsers and Redis Streams.

Without ``redis_url`` it starts an embedded valkey-server and one local browser per shard, at most
``max_connections`` (consecutive shards then share a browser, run in one page op); with it, it uses the
workers registered there. A façade over named parts: ``prepare`` cuts the model and chooses browsers
(``planning``, steered by ``runtime.history_view``); a ``runtime.deployment.Deployment`` owns the broker,
workers, fleet, placement and watchers and closes them in one path; ``runtime.client.RequestClient`` and
``runtime.generation`` run requests and generation sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from broker.address import redact
from broker.browsers import find_executable
from broker.errors import BrokerError
from broker.messages import DeadLetter
from coordinator.arguments import check_arguments, check_dtype
from coordinator.errors import InputError, XshardError
from coordinator.generation.sampling import Sampling
from coordinator.model.resolve import ResolvedModel, resolve_model
from coordinator.model.validation import validate_inputs
from coordinator.planning.allocation import Slot, allocate
from coordinator.planning.calibration import CALIBRATION_TEXT
from coordinator.planning.precision import AUTO, Precision, PrecisionBound
from coordinator.planning.precisionset import PrecisionRequest, apply_precision, precision_events
from coordinator.planning.recommendations import allocate_from_history, recommend
from coordinator.planning.shardset import ShardSet
from coordinator.planning.sizedset import build_sized_shard_set, parse_num_shards, with_reason
from coordinator.planning.sizing import Sizing
from coordinator.recovery import Policy
from coordinator.runtime.client import RequestClient, RequestLabels
from coordinator.runtime.deployment import Deployment, DeploymentConfig
from coordinator.runtime.fleet import Fleet
from coordinator.runtime.generation import GeneratedToken, GenerationClient, Tokenizer, check_prompt
from coordinator.runtime.history_view import HistoryView
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.requests import RequestTracker
from coordinator.settings import ManagerSettings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
NOT_INITIALIZED = "the manager is not initialized: call initialize_sharding() first"


def _installed(browser: str) -> bool:
    return find_executable(browser) is not None


class ModelShardingManager:
    """Shards a model across browsers and runs inference through the shards."""

    def __init__(
        self,
        model_name: str,
        num_shards: int | str = 2,
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
        generation: bool = False,
        dtype: str = "fp32",
    ) -> None:
        check_arguments(fault_tolerance_level, recovery_strategy, max_connections, enable_ipfs)
        self.dtype = dtype.strip().lower()
        # per shard: custom_browser_allocation[i]["dtype"]; every dtype checked against its platform now
        self._dtype_per_shard = check_dtype(self.dtype, platform, custom_browser_allocation or {})
        self.model_name = model_name
        self.requested_shards = parse_num_shards(num_shards)  # a count, or "auto": sized to the pages
        self.num_shards = self.requested_shards if isinstance(self.requested_shards, int) else 0  # set by prepare
        self.sizing: Sizing | None = None
        self.shard_type = shard_type
        self.model_type = model_type
        self.enable_ipfs = enable_ipfs  # this coordinator serves its shard files by hash (``arguments``)
        self.max_connections = max_connections
        self.db_path = db_path
        self.fault_tolerance_level = fault_tolerance_level
        self.recovery_strategy = recovery_strategy
        self.custom_browser_allocation = dict(custom_browser_allocation or {})
        self.redis_url = redis_url if redis_url is not None else os.environ.get("REDIS_URL") or None
        self.browsers = list(browsers) if browsers else None
        self.platform = platform
        self.generation = generation  # a causal LM converted with a KV cache, for generate() and stream()
        self.settings = settings or ManagerSettings.from_env()
        self.coordinator_id = self.settings.coordinator_id or f"coord-{uuid.uuid4().hex[:10]}"
        self.policy = Policy.from_env(level=fault_tolerance_level, strategy=recovery_strategy)
        self.last_error: str | None = None
        self.initialized = False
        self.model: ResolvedModel | None = None
        self.shards: ShardSet | None = None
        self.metrics = LiveMetrics(shard_type)
        self.fleet = Fleet(self.settings.heartbeat_max_age_ms)
        self._progress = progress or (lambda msg: log.info("%s", msg))
        self._slots: dict[int, Slot] = {}
        self._history = HistoryView(db_path, model_name, shard_type)
        self._deployment: Deployment | None = None
        self._client: RequestClient | None = None
        self._generation: GenerationClient | None = None
        self._tokenizer: Tokenizer | None = None

    @property
    def broker_url(self) -> str | None:
        """The broker in use (the embedded one's URL when no ``redis_url`` was given)."""
        return self._deployment.url if self._deployment else None

    @property
    def route(self) -> tuple[str, ...]:
        """Stage stream names of this manager's plan, in order."""
        return self._deployment.route if self._deployment else ()

    @property
    def reply_stream(self) -> str | None:
        """This coordinator's reply stream (results, failures), once initialized."""
        rt = self._deployment.runtime_or_none if self._deployment else None
        return rt.dispatcher.reply_stream if rt else None

    @property
    def planned_slots(self) -> dict[int, Slot]:
        """What ``prepare`` chose for each shard (browser, platform, specialization, reason)."""
        return dict(self._slots)

    @property
    def allocation(self) -> dict[int, dict[str, Any]]:
        """Where each shard was loaded (shard index -> browser, provider, worker, reason; ``replicas``)."""
        placement = self._deployment.placement if self._deployment else None
        return placement.allocation if placement else {}

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
        self.model = await asyncio.to_thread(
            resolve_model, self.model_name, s.cache_dir, self._progress, kv_cache=self.generation
        )
        self._progress(f"cutting {self.model_name} into {self.requested_shards} {self.shard_type} shards")
        explicit = self.dtype != AUTO and not self._dtype_per_shard
        shards, sizing = await asyncio.to_thread(
            build_sized_shard_set,
            self.model.onnx_path,
            self.requested_shards,
            self.shard_type,
            s.cache_dir,
            s.weight_share,
            s.page_budget_bytes,
            None,
            Precision.parse(self.dtype) if explicit else Precision.FP32,
        )
        groups = shards.plan.shard_groups  # the shards asked for; each holds one stage or more
        self.num_shards = len(groups)
        self.sizing = sizing
        self._progress(f"sizing: {sizing.reason}")
        by_shard = allocate(
            self.num_shards,
            model_type=self.model_type,
            model_kind=self.model.kind,
            installed=_installed,
            platform=self.platform,
            browsers=self.browsers,
            custom=self.custom_browser_allocation,
            stage_kinds=tuple(shards.plan.stages[g[0]].kind for g in groups),
        )
        self._slots = {i: by_shard[g] for g, members in enumerate(groups) for i in members}
        if await self._history.read(shards.plan.plan_id):
            self._steer_by_history(groups)
        self._slots = with_reason(self._slots, sizing.reason)
        shards = await asyncio.to_thread(apply_precision, shards, self._precision_request(groups), self._progress)
        if shards.plan.precisions:
            chosen = ", ".join(f"shard {g} {c.precision.value}" for g, c in enumerate(shards.choices))
            self._progress(f"precision: {chosen}")
        self.metrics.stage_kinds = {stage.index: stage.kind for stage in shards.plan.stages}
        self.shards = shards
        return shards

    def _precision_request(self, groups: Sequence[Sequence[int]]) -> PrecisionRequest:
        """What each shard is to run in; ``auto`` calibrates on the model's tokenizer where it has one."""
        ids = None
        if self.model is not None and self.model.tokenizer_path is not None:
            ids = tuple(Tokenizer(self.model).encode(CALIBRATION_TEXT, chat=False))
        return PrecisionRequest(
            dtype=self.dtype,
            platforms=tuple(self._slots[g[0]].platform for g in groups),
            per_shard=self._dtype_per_shard,
            bound=PrecisionBound(self.settings.precision_min_top1, self.settings.precision_max_relative_diff),
            calibration_ids=ids,
        )

    def _steer_by_history(self, groups: Sequence[Sequence[int]]) -> None:
        """Measured history of this model steers the allocation (unless the user fixed it)."""
        stats = self._history.stats
        if self.browsers or not stats:
            return
        self._slots = allocate_from_history(
            self._slots,
            stats,
            platform=self.platform,
            fixed={i for g in self.custom_browser_allocation if g < len(groups) for i in groups[g]},
            installed=_installed if self.redis_url is None else (lambda b: True),
        )

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The inputs as the model's arrays, or InputError; needs ``prepare()`` first."""
        if self.shards is None:
            raise XshardError("call prepare() or initialize_sharding() first")
        return validate_inputs(inputs, self.shards.profile.inputs, self.shards.profile.vocab_limits)

    async def initialize_sharding(self) -> bool:
        """Prepare the model, connect the broker, start or find workers, load the shards."""
        if self.initialized:
            return True
        if self._deployment is not None:
            await self._deployment.close()  # what a failed earlier try left
        try:
            shards = await self.prepare()
            self._deployment = self._new_deployment()
            await self._deployment.start(shards, self._slots)
            await self._record_precisions(shards)
        except (XshardError, BrokerError, ValueError, OSError) as e:
            self.last_error = str(e)
            log.info("initialize_sharding failed: %s", e)
            return False
        labels = RequestLabels(self.model_name, self.shard_type, self.num_shards, self.coordinator_id)
        self._client = RequestClient(self._deployment, self.metrics, labels, self.settings.request_timeout_s, shards)
        if self.model is not None and self.model.kv_cache:
            timeout_s = self.settings.request_timeout_s
            self._tokenizer = self._tokenizer or Tokenizer(self.model)
            self._generation = GenerationClient(
                self._deployment, shards, self.model, self.metrics, timeout_s, self._tokenizer
            )
        self.initialized = True
        return True

    async def _record_precisions(self, shards: ShardSet) -> None:
        """Each shard's precision (and what ``auto`` measured) onto the events stream, so into the history."""
        if self._deployment is None or self._deployment.broker is None:
            return
        for event in precision_events(shards, self.model_name):
            await self._deployment.broker.emit(event)

    def _new_deployment(self) -> Deployment:
        config = DeploymentConfig(
            settings=self.settings,
            coordinator_id=self.coordinator_id,
            model_name=self.model_name,
            shard_type=self.shard_type,
            redis_url=self.redis_url,
            db_path=self.db_path,
            max_browsers=self.max_connections,
            serve_shard_files=self.enable_ipfs,
        )
        return Deployment(
            config,
            fleet=self.fleet,
            policy=self.policy,
            metrics=self.metrics,
            progress=self._progress,
            on_history_commit=self._history.refresh if self.db_path else None,
        )

    async def close(self) -> None:
        """Release shard sessions, stop local workers and the embedded broker."""
        self._client = self._generation = None
        if self._deployment is not None:
            await self._deployment.close()
        self.initialized = False

    # -- inference ---------------------------------------------------------------------------

    def _requests(self) -> RequestClient:
        if self._client is None:
            raise XshardError(NOT_INITIALIZED)
        return self._client

    async def run_inference_sharded(self, inputs: Mapping[str, Any], max_retries: int = 2) -> dict[str, Any]:
        """Run one request through the shards; ``{"result", "metrics"}`` or ``{"error", "error_kind"}``.

        ``max_retries`` bounds the tries of each stage beyond the first; the recovery policy
        (``fault_tolerance_level``, ``recovery_strategy``) decides how each retry is made.
        """
        if not self.initialized or self.shards is None or self._client is None:
            return {"error": NOT_INITIALIZED, "error_kind": "state"}
        try:
            arrays = self.check_inputs(inputs)
        except InputError as e:
            return {"error": str(e), "error_kind": "input"}
        return await self._client.run(arrays, max_retries)

    def generation_client(self) -> GenerationClient:
        if self._generation is None:
            raise XshardError("generation needs a causal LM on an initialized manager built with generation=True")
        return self._generation

    def check_generation(self, prompt: str | Sequence[int], max_new_tokens: int = 32, chat: bool = False) -> list[int]:
        """The prompt's token ids, or InputError; needs ``prepare()`` only (no broker, no browser)."""
        if self.model is None or not self.model.kv_cache:
            raise InputError(f"{self.model_name} is not prepared as a causal LM for generation (generation=True)")
        self._tokenizer = self._tokenizer or Tokenizer(self.model)
        return check_prompt(self._tokenizer, prompt, max_new_tokens, chat)

    async def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        chat: bool = False,
        result: dict[str, Any] | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Generate after ``prompt`` (text or token ids), one ``GeneratedToken`` at a time (greedy unless
        ``temperature`` > 0); ``result``, when given, gets what ``generate`` returns."""
        client = self.generation_client()
        ids = client.check(prompt, max_new_tokens, chat)
        async for token in client.stream(ids, max_new_tokens, Sampling(temperature, top_k, top_p, seed), result):
            yield token

    async def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, **options: Any) -> dict[str, Any]:
        """``{"text", "token_ids", "prompt_token_ids", "finish_reason", "metrics"}`` (see ``stream``)."""
        result: dict[str, Any] = {}
        async for _ in self.stream(prompt, max_new_tokens, **options, result=result):
            pass
        return result

    async def score(self, prompt: str | Sequence[int]) -> np.ndarray:
        """The next-token logits at every position of ``prompt`` ([positions, vocab]), teacher-forced through
        the shards in one prefill: for perplexity, or to check a precision against a reference."""
        client = self.generation_client()
        return await client.score(client.check(prompt, 1, False))

    async def resume(self) -> list[str]:
        """Requests this coordinator id accepted before a restart and has not finished; ``wait_for`` each."""
        return await self._requests().resume()

    async def wait_for(self, request_id: str) -> dict[str, Any]:
        """The outcome of a request accepted earlier (e.g. before a coordinator restart)."""
        return await self._requests().wait_for(request_id)

    async def dead_letters(self) -> list[tuple[str, DeadLetter | None, str]]:
        return await self._requests().dead_letters()

    async def replay(self, entry_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Re-enqueue dead-lettered jobs of this plan (all, or those ids) and wait for their outcomes."""
        return await self._requests().replay(entry_ids)

    # -- reporting ---------------------------------------------------------------------------

    def get_metrics(self) -> dict[str, Any]:
        dep, plan = self._deployment, self.shards.plan if self.shards else None
        return {
            "model_name": self.model_name,
            "model_path": str(self.model.onnx_path) if self.model else None,
            "model_kind": self.model.kind if self.model else None,
            "num_shards": self.num_shards,
            "shard_type": self.shard_type,
            "model_type": self.model_type,
            "dtype": self.dtype,
            "initialized": self.initialized,
            "fault_tolerance_level": self.fault_tolerance_level,
            "recovery_strategy": self.recovery_strategy,
            "broker": redact(url) if (url := (dep.url if dep else None) or self.redis_url) else None,
            "embedded_broker": dep is not None and dep.embedded is not None,
            "plan_id": plan.plan_id if plan else None,
            "boundary_kind": plan.boundary_kind if plan else None,
            "shards": self.shards.stage_rows() if self.shards else [],
            "browser_allocation": {i: dict(v) for i, v in sorted(self.allocation.items())},
            "recommendations": recommend(self._history.stats, self.allocation, self.model_type),
            "circuit_breakers": self.fleet.breakers.snapshot(time.monotonic()),
            "requests": self.metrics.requests.as_dict(),
        }

    def get_performance_history(self) -> dict[str, Any]:
        """The guide's structure: live counters of this manager, merged with what the database
        already held for this model and plan when ``db_path`` was given."""
        return self._history.merged(self.metrics.history())

    @property
    def tracker(self) -> RequestTracker | None:
        """The requests in flight and the results delivered to this coordinator (None before start)."""
        rt = self._deployment.runtime_or_none if self._deployment else None
        return rt.tracker if rt else None

    async def _assign_stage(self, index: int, worker_id: str) -> bool:
        return await self._deployment.assign_stage(index, worker_id) if self._deployment else False
