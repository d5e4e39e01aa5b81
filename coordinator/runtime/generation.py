"""The generation client, beside the request client: text in, tokens out, through a started deployment of a
causal LM converted with a KV cache.

Each call is one session (``coordinator.generation.session``) pinned to the workers the placement loaded
each shard on; several sessions run at once and pipeline through the shards. A holder that lost the
session's cache (its browser restarted, the worker stopped heartbeating: then another worker serving the
stage takes it) is rebuilt by a replay of the token history, recorded like any other recovery (the
result's ``recovery_events``, ``get_performance_history()``, the events stream and so DuckDB).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker.clock import now_ms
from broker.messages import RecoveryEvent
from coordinator.errors import InputError
from coordinator.generation.sampling import Sampling
from coordinator.generation.session import Conditioning, GenerationSession, Recovery, SessionRoute, slots_of
from coordinator.model.resolve import ResolvedModel
from coordinator.planning.shardset import ShardSet
from coordinator.runtime.deployment import Deployment
from coordinator.runtime.metrics import LiveMetrics
from coordinator.runtime.results import where_it_ran


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """One new token and the text it adds (empty while a multi-byte character is incomplete)."""

    token_id: int
    text: str


class Tokenizer:
    """The model's transformers tokenizer (as its ``AutoTokenizer`` loads it), and its context length."""

    def __init__(self, model: ResolvedModel) -> None:
        self.model = model
        self._tok: Any = None
        if model.tokenizer_path is not None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(model.tokenizer_path.parent))
        self.context_length, self.eos_token_id = self._config()

    def _config(self) -> tuple[int, int | None]:
        config: dict[str, Any] = {}
        hf = self.model.hf_dir
        if hf is not None and (hf / "config.json").is_file() and self.model.gguf_file is None:
            config = json.loads((hf / "config.json").read_text())
        elif hf is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(hf), gguf_file=self.model.gguf_file).to_dict()
        length = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
        eos = self._tok.eos_token_id if self._tok is not None else config.get("eos_token_id")
        return length, eos if isinstance(eos, int) else None

    def encode(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self._tok is None:
            raise InputError(f"{self.model.source} has no tokenizer: give the prompt as token ids")
        if chat:
            ids = self._tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        return [int(t) for t in self._tok(prompt)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True)) if self._tok is not None else ""


def check_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], max_new_tokens: int, chat: bool) -> list[int]:
    """The prompt's token ids, or InputError (empty, too long, ``max_new_tokens`` out of range)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if tokenizer.model.kind == "audio":
        raise InputError(f"{tokenizer.model.source} decodes speech: give input_features (SpeechGeneration)")
    if isinstance(prompt, str) and not prompt.strip():
        raise InputError("the prompt is empty")
    ids = tokenizer.encode(prompt, chat)
    limit = tokenizer.context_length
    if not ids:
        raise InputError("the prompt is empty")
    if len(ids) >= limit:
        raise InputError(f"the prompt has {len(ids)} tokens; the context holds {limit}")
    if len(ids) + max_new_tokens > limit:
        raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the context {limit}")
    return ids


class GenerationClient:
    """Sessions through a started deployment; ``generate`` returns the result dict, ``stream`` tokens."""

    def __init__(
        self,
        deployment: Deployment,
        shards: ShardSet,
        model: ResolvedModel,
        metrics: LiveMetrics,
        timeout_s: float,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.deployment = deployment
        self.shards = shards
        self.model = model
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.tokenizer = tokenizer or Tokenizer(model)

    def check(self, prompt: str | Sequence[int], max_new_tokens: int, chat: bool) -> list[int]:
        return check_prompt(self.tokenizer, prompt, max_new_tokens, chat)

    def route(self) -> SessionRoute:
        """Where a new session's steps go: each stage's stream and its (first) worker's direct stream."""
        dep = self.deployment
        assert dep.placement is not None and dep.broker is not None
        workers = tuple(dep.placement.holders[st.index] for st in self.shards.plan.stages)
        holders = tuple(dep.broker.keys.direct(w) for w in workers)
        return SessionRoute(
            self.shards.plan.plan_id, dep.route, holders, slots_of(self.shards.plan.stages), "logits", workers
        )

    async def alive(self, worker_ids: Sequence[str]) -> set[str]:
        live = await self.deployment.live_workers()
        return {w.worker_id for w in live} & set(worker_ids)

    async def candidates(self, route: SessionRoute, stage: int) -> tuple[bool, bool]:
        """Whether a live worker other than the holder serves ``stage``, and whether a live spare could."""
        replicas = await self._replicas(route, stage)
        return bool(replicas), bool(await self._spares(route))

    async def take_over(self, route: SessionRoute, stage: int, redistribute: bool) -> SessionRoute | None:
        """``route`` with ``stage`` held by a live worker already serving it, or (``redistribute``) by a spare
        given the stage first; None when there is none."""
        dep = self.deployment
        assert dep.broker is not None
        chosen = next(iter(sorted(await self._replicas(route, stage))), None)
        if chosen is None and redistribute:
            for spare in await self._spares(route):
                if await dep.assign_stage(stage, spare):
                    chosen = spare
                    break
        if chosen is None:
            return None
        workers = tuple(chosen if i == stage else w for i, w in enumerate(route.workers))
        holders = tuple(dep.broker.keys.direct(w) for w in workers)
        return SessionRoute(route.plan_id, route.stages, holders, route.slots, route.logits_name, workers)

    async def _replicas(self, route: SessionRoute, stage: int) -> set[str]:
        return await self.alive([w for w in self.deployment.fleet.serving.get(stage, []) if w != route.workers[stage]])

    async def _spares(self, route: SessionRoute) -> list[str]:
        known = await self.deployment.live_workers()
        return sorted(w.worker_id for w in known if w.worker_id not in route.workers)

    async def score(self, prompt_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits at every position of ``prompt_ids`` ([positions, vocab])."""
        dep = self.deployment
        assert dep.broker is not None
        session = GenerationSession(dep.broker, self.route(), uuid.uuid4().hex, self.timeout_s, dep.policy, self)
        try:
            return await session.score(prompt_ids)
        finally:
            await session.close()

    async def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling,
        result: dict[str, Any] | None = None,
        conditioning: Conditioning | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Checked prompt ids in, each new token as it is chosen; once done ``result`` (when given) holds
        the result. ``conditioning``: feeds besides the tokens (an encoder's output) and a logits rule."""
        dep = self.deployment
        assert dep.broker is not None
        session = GenerationSession(dep.broker, self.route(), uuid.uuid4().hex, self.timeout_s, dep.policy, self)
        started, first_ms, new, text = time.perf_counter(), 0.0, [], ""
        try:
            eos = self.tokenizer.eos_token_id
            async for token in session.tokens(prompt_ids, max_new_tokens, eos, sampling, conditioning):
                first_ms = first_ms or (time.perf_counter() - started) * 1000.0
                new.append(token)
                now = self.tokenizer.decode(new)
                yield GeneratedToken(token, now[len(text) :])
                text = now
        finally:
            await session.close()
        total_s = time.perf_counter() - started
        events = [await self._record(session.session_id, r) for r in session.log.replays]
        finish = "eos" if new and new[-1] == self.tokenizer.eos_token_id else "length"
        out = {
            "text": text,
            "token_ids": new,
            "prompt_token_ids": list(prompt_ids),
            "finish_reason": finish,
            "metrics": self._metrics(session, len(new), first_ms, total_s, events),
        }
        if result is not None:
            result.update(out)

    def _metrics(
        self, session: GenerationSession, n: int, first_ms: float, total_s: float, events: list[dict[str, Any]]
    ) -> dict[str, Any]:
        decode_s = total_s - first_ms / 1000.0
        components = [
            {**where_it_ran(t), "kernel_ms": round(session.log.kernel_ms.get(t.shard_index, 0.0), 3)}
            for t in session.log.traces
        ]
        return {
            "session_id": session.session_id,
            "tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else 0.0,
            "time_to_first_token_ms": round(first_ms, 3),
            "total_ms": round(total_s * 1000.0, 3),
            "steps": session.log.steps,
            **decode_split(session.log.step_kernel_ms, n, decode_s),
            "component_results": components,
            "recovery_events": events,
        }

    async def _record(self, session_id: str, r: Recovery) -> dict[str, Any]:
        """A replay (or a restore) as a recovery event: in the live metrics and on the events stream (so in DuckDB)."""
        dep = self.deployment
        assert dep.broker is not None
        browser = dep.fleet.browser(r.worker_id) if r.worker_id else ""
        event = RecoveryEvent(
            event_id=uuid.uuid4().hex,
            ts_ms=now_ms(),
            request_id=f"{session_id}#{r.step}",
            plan_id=self.shards.plan.plan_id,
            model_name=dep.config.model_name,
            shard_index=r.stage,
            worker_id=r.worker_id,
            browser=browser,
            platform="",
            failure=r.failure,
            action=r.action,
            success=True,
            duration_ms=r.duration_ms,
            error=r.error[:1000],
        )
        await dep.broker.emit(event)
        return self.metrics.record_recovery(event)


def decode_split(step_kernel_ms: Sequence[float], n: int, decode_s: float) -> dict[str, float]:
    """Per decode token: its wall time, the shards' kernel time, and the share that is not kernel (hops,
    codec, scheduling). The prefill (step 0) is left out; empty when there was no decode step."""
    decode = list(step_kernel_ms[1:n])
    if not decode or decode_s <= 0:
        return {}
    token_ms = decode_s * 1000.0 / (n - 1)
    kernel_ms = sum(decode) / len(decode)
    return {
        "decode_ms_per_token": round(token_ms, 3),
        "decode_kernel_ms_per_token": round(kernel_ms, 3),
        "decode_non_kernel_share": round(max(0.0, 1.0 - kernel_ms / token_ms), 4),
    }
