"""One generation session through KV-cache shards, pinned to one worker per stage (sticky routing).

The driver sends each step to the direct stream of the worker holding stage 0's cache; each worker hands
the step on to the next holder, the last one replies with the logits of the new positions. The prefill
feeds the whole prompt (``fresh``: every page starts the session's cache empty), each decode step one
token. When a page lost the session's cache (its browser died or was restarted, the session expired) the
driver replays: a fresh step over the whole history (every token fed so far and the pending ones) rebuilds
every stage's cache, and generation goes on; the logits of the last position are those of the step it
replaces, so the tokens are those of an undisturbed run.

A session may be conditioned on more than its tokens (``Conditioning``): tensors fed with every fresh
step (the prefill, a replay) and with length 0 along axis 1 with the others, e.g. the encoder output a
speech decoder keeps as cross-attention state in the pages; the driver holds them, so a replay re-feeds
them. Its ``rule`` adjusts each new token's logits before the choice (suppressed tokens).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from broker.clock import now_ms
from broker.kinds import FailureKind
from broker.messages import Message, StageTrace
from broker.sessions import (
    SessionEnd,
    SessionFailure,
    SessionHistory,
    SessionRefusal,
    SessionResult,
    SessionStep,
    StateSlot,
    load_history,
    save_history,
    state_entry,
)
from broker.streams import Broker
from coordinator.errors import ModelError

from .sampling import Sampling, choose_token

log = logging.getLogger(__name__)

HISTORY_TTL_S = 3600  # how long a session's token history stays in Redis after its last token

REPLAYABLE = frozenset(
    {FailureKind.BROWSER_LOST, FailureKind.TIMEOUT, FailureKind.UNAVAILABLE, FailureKind.WORKER_LOST}
)


class GenerationError(ModelError):
    """A session step that cannot complete (refused by a page, a kernel error, no reply)."""


@dataclass(frozen=True, slots=True)
class SessionRoute:
    """Where a session's steps go: per stage, its stage stream and the holder's direct stream; the cache
    slots of every stage; the name of the logits the last stage returns."""

    plan_id: str
    stages: tuple[str, ...]
    holders: tuple[str, ...]
    slots: tuple[StateSlot, ...]
    logits_name: str = "logits"
    workers: tuple[str, ...] = ()  # per stage: the holder's worker id (watched for liveness when given)


class Rerouter(Protocol):
    """Picks new holders for a session whose holder of ``stage`` was lost (or keeps the route)."""

    async def __call__(self, route: SessionRoute, stage: int) -> SessionRoute: ...


class Liveness(Protocol):
    """Which of ``worker_ids`` are alive now (heartbeats in the registry)."""

    async def __call__(self, worker_ids: Sequence[str]) -> set[str]: ...


class LogitsRule(Protocol):
    """The logits of the ``index``-th new token (0: the first) as the choice should see them."""

    def __call__(self, logits: np.ndarray, index: int) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Conditioning:
    """What a session is conditioned on besides its tokens (see the module docstring)."""

    feeds: Mapping[str, np.ndarray] = field(default_factory=dict)
    rule: LogitsRule | None = None

    def tensors(self, fresh: bool) -> dict[str, np.ndarray]:
        """The feeds of a step: whole when ``fresh``, else with length 0 along axis 1."""
        return {name: a if fresh else a[:, :0] for name, a in self.feeds.items()}


@dataclass(frozen=True, slots=True)
class Replay:
    """A session step that lost a stage's cache and was replayed (what the recovery event records)."""

    step: int
    stage: int
    worker_id: str
    failure: str
    error: str
    duration_ms: float = 0.0
    action: str = "replay"  # or "restore": the holder's worker put its copy of the cache into a new page


@dataclass
class SessionLog:
    """What happened in one session: its replays (why, at which step) and the last step's traces."""

    replays: list[Replay] = field(default_factory=list)
    traces: list[StageTrace] = field(default_factory=list)
    kernel_ms: dict[int, float] = field(default_factory=dict)  # per shard, all steps
    step_kernel_ms: list[float] = field(default_factory=list)  # per step that succeeded: all shards' kernels
    steps: int = 0


class GenerationSession:
    """Drives one session's steps over the broker; ``tokens`` yields each new token as it is chosen."""

    def __init__(
        self,
        broker: Broker,
        route: SessionRoute,
        session_id: str = "",
        step_timeout_s: float = 120.0,
        max_replays: int = 3,
        reroute: Rerouter | None = None,
        alive: Liveness | None = None,
    ) -> None:
        self.broker = broker
        self.route = route
        self.session_id = session_id or uuid.uuid4().hex
        self.reply_stream = broker.keys.reply(f"session-{self.session_id}")
        self.step_timeout_s = step_timeout_s
        self.max_replays = max_replays
        self.log = SessionLog()
        self.reroute = reroute
        self.history_ttl_s = HISTORY_TTL_S
        self.alive = alive
        self._last_id = "0"
        self._sent = 0
        self._conditioning = Conditioning()

    async def tokens(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_token_id: int | None,
        sampling: Sampling,
        conditioning: Conditioning | None = None,
    ) -> AsyncIterator[int]:
        """Prefill ``prompt_ids``, then one step per new token, until EOS or ``max_new_tokens``.

        The token history is kept in Redis after each token (``broker.sessions.save_history``): a driver
        with the same session id and prompt resumes where that history ends (the tokens already generated
        are yielded again, the rest generated after a replay of them all)."""
        rng = np.random.default_rng(sampling.seed)
        self._conditioning = conditioning or Conditioning()
        rule = self._conditioning.rule
        prompt = [int(t) for t in prompt_ids]
        await self.broker.delete(self.reply_stream)  # replies to an earlier driver of this session
        stored = await load_history(self.broker, self.session_id)
        generated = list(stored.generated) if stored and list(stored.prompt) == prompt else []
        for token in generated:
            yield token
            rng.random()  # a sampled token drew once from the generator
        if generated and (len(generated) >= max_new_tokens or generated[-1] == eos_token_id):
            return
        fed: list[int] = []
        pending = [*prompt, *generated]
        for _ in range(max_new_tokens - len(generated)):
            logits = (await self._step_or_replay(fed, pending))[-1]
            fed += pending
            token = choose_token(rule(logits, len(generated)) if rule else logits, sampling, rng)
            generated.append(token)
            history = SessionHistory(self.route.plan_id, tuple(prompt), tuple(generated))
            await save_history(self.broker, self.session_id, history, self.history_ttl_s)
            yield token
            if eos_token_id is not None and token == eos_token_id:
                return
            pending = [token]

    async def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """The next-token logits at every position of ``token_ids`` ([positions, vocab]): one prefill through
        the shards, teacher-forced (each position sees the given tokens before it, not chosen ones)."""
        await self.broker.delete(self.reply_stream)
        return await self._step_or_replay([], [int(t) for t in token_ids])

    async def forget(self) -> None:
        """Drop the session's stored history (a finished session is not resumed)."""
        await self.broker.delete(self.broker.keys.session(self.session_id))

    async def _step_or_replay(self, fed: list[int], pending: list[int]) -> np.ndarray:
        """The logits of ``pending``'s positions ([positions, vocab]); a lost cache is rebuilt from ``fed`` first."""
        replays, fresh, lost_at = 0, not fed, 0.0
        while True:
            history = [] if fresh else fed
            reply = await self._step(history, pending if not fresh else [*fed, *pending], fresh)
            if isinstance(reply, SessionResult):
                if lost_at:
                    last = self.log.replays[-1]
                    self.log.replays[-1] = dataclasses.replace(last, duration_ms=now_ms() - lost_at)
                self.log.steps += 1
                self.log.traces = list(reply.trace)
                self.log.step_kernel_ms.append(sum(t.kernel_ms for t in reply.trace))
                self.log.replays += [  # a holder's worker restored its page's cache from its copy (no replay)
                    Replay(
                        self.log.steps - 1,
                        t.shard_index,
                        t.worker_id,
                        FailureKind.BROWSER_LOST.value,
                        t.recovered,
                        t.recovery_ms,
                        "restore",
                    )
                    for t in reply.trace
                    if t.recovered
                ]
                for t in reply.trace:
                    self.log.kernel_ms[t.shard_index] = self.log.kernel_ms.get(t.shard_index, 0.0) + t.kernel_ms
                return np.asarray(reply.tensors[self.route.logits_name])[0]
            replayable = reply.refusal == SessionRefusal.MISSING or FailureKind.parse(reply.kind) in REPLAYABLE
            if not replayable or replays >= self.max_replays:
                raise GenerationError(f"session {self.session_id} step {self.log.steps}: {reply.error}")
            replays, fresh, lost_at = replays + 1, True, lost_at or now_ms()
            self.log.replays.append(Replay(self.log.steps, reply.stage_index, reply.worker_id, reply.kind, reply.error))
            log.warning(
                "session %s: stage %d lost its cache on %s (%s); replaying %d tokens",
                self.session_id,
                reply.stage_index,
                reply.worker_id,
                reply.error,
                len(fed) + len(pending),
            )
            if self.reroute is not None:
                self.route = await self.reroute(self.route, reply.stage_index)

    async def _step(self, history: list[int], new: list[int], fresh: bool) -> SessionResult | SessionFailure:
        total = len(history) + len(new)
        feeds = {
            "input_ids": np.asarray([new], np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(len(history), total, dtype=np.int64)[None, :],
            **self._conditioning.tensors(fresh),
        }
        r = self.route
        step = SessionStep(
            session_id=self.session_id,
            step=self.log.steps,
            plan_id=r.plan_id,
            stage_index=0,
            route=r.holders,
            stages=r.stages,
            reply_stream=self.reply_stream,
            tensors=feeds,
            states=tuple(state_entry(s) for s in r.slots),
            fresh=fresh,
            enqueued_ms=now_ms(),
            attempt=self._sent + 1,
        )
        self._sent += 1  # each send its own attempt: a late reply to an earlier one is never taken
        await self.broker.add(r.holders[0], step)  # type: ignore[arg-type]
        return await self._reply(self.log.steps)

    async def _reply(self, step: int) -> SessionResult | SessionFailure:
        """The step's reply; a holder that stops heartbeating meanwhile is a lost cache (``WORKER_LOST``)."""
        deadline = time.monotonic() + self.step_timeout_s
        while time.monotonic() < deadline:
            for d in await self.broker.read(self.reply_stream, self._last_id, count=16, block_ms=500):
                self._last_id = d.entry_id
                msg: Message | None = d.message  # type: ignore[assignment]
                if isinstance(msg, SessionResult | SessionFailure) and (msg.step, msg.attempt) == (step, self._sent):
                    return msg
            lost = await self._lost_holder()
            if lost is not None:
                stage, worker = lost
                error = f"worker {worker} holding stage {stage} stopped heartbeating"
                r = self.route
                return SessionFailure(self.session_id, step, r.plan_id, stage, worker, FailureKind.WORKER_LOST, error)
        raise GenerationError(f"session {self.session_id} step {step}: no reply within {self.step_timeout_s}s")

    async def _lost_holder(self) -> tuple[int, str] | None:
        workers = self.route.workers
        if self.alive is None or not workers:
            return None
        live = await self.alive(workers)
        return next(((i, w) for i, w in enumerate(workers) if w not in live), None)

    async def close(self) -> None:
        """Free the session's caches in every holder's page and drop its reply stream."""
        for holder in dict.fromkeys(self.route.holders):
            await self.broker.add(holder, SessionEnd(self.session_id))  # type: ignore[arg-type]
        await self.broker.delete(self.reply_stream)


def slots_of(stages: Sequence[object]) -> tuple[StateSlot, ...]:
    """Every stage's cache slots, batch 1, from planner stages (``state_pairs`` with ``empty_shape``)."""
    out = []
    for index, stage in enumerate(stages):
        for p in stage.state_pairs:  # type: ignore[attr-defined]
            out.append(StateSlot(index, p.input_name, p.output_name, p.dtype, p.empty_shape(1)))
    return tuple(out)
