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
from broker.kinds import FailureKind, RecoveryAction
from broker.messages import Message, StageFailure, StageHop, StageResult, StageTrace, StateSlot
from broker.sessions import (
    SessionEnd,
    SessionHistory,
    SessionRefusal,
    copied_step,
    drop_cache_copies,
    load_history,
    move_step,
    save_history,
)
from broker.streams import Broker
from coordinator.errors import GenerationError
from coordinator.recovery.policy import Policy
from coordinator.recovery.session import Fail, Replay, Reroute, Restore, SessionFault, decide_session

from .sampling import Sampling, choose_token

log = logging.getLogger(__name__)

HISTORY_TTL_S = 3600  # how long a session's token history stays in Redis after its last token


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


class Holders(Protocol):
    """What the driver needs of the deployment to recover a session: which holders live, which workers could
    take a stage over, and the route with one that did (``take_over``; None: none could)."""

    async def alive(self, worker_ids: Sequence[str]) -> set[str]: ...

    async def candidates(self, route: SessionRoute, stage: int) -> tuple[bool, bool]:
        """(a live worker other than the holder already serves the stage, a live spare could be given it)."""
        ...

    async def take_over(self, route: SessionRoute, stage: int, redistribute: bool) -> SessionRoute | None: ...


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
class Recovery:
    """What a session did about a lost cache (what its recovery event records): the step, the stage, the holder
    it lost, why, and the action (``coordinator.recovery.session``, or a worker's own restore)."""

    step: int
    stage: int
    worker_id: str
    failure: FailureKind
    error: str
    duration_ms: float = 0.0
    action: RecoveryAction = RecoveryAction.REPLAY


@dataclass
class SessionLog:
    """What happened in one session: its replays (why, at which step) and the last step's traces."""

    replays: list[Recovery] = field(default_factory=list)
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
        policy: Policy | None = None,
        holders: Holders | None = None,
    ) -> None:
        self.broker = broker
        self.route = route
        self.session_id = session_id or uuid.uuid4().hex
        self.reply_stream = broker.keys.reply(f"session-{self.session_id}")
        self.step_timeout_s = step_timeout_s
        self.policy = policy or Policy()
        self.log = SessionLog()
        self.holders = holders
        self.history_ttl_s = HISTORY_TTL_S
        self._last_id = "0"
        self._sent = 0
        self._conditioning = Conditioning()
        self._taken: dict[int, str] = {}  # stage -> the lost holder's stream its new holder takes steps from
        self._restore_stage = -1  # the stage whose new holder restores its cache at the next step through it

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
        """The logits of ``pending``'s positions ([positions, vocab]); a lost cache is recovered as
        ``recovery.session.decide_session`` says (a restore, a replay of ``fed`` first, a reroute)."""
        fresh, lost_at = not fed, 0.0
        resend = True
        while True:
            history = [] if fresh else fed
            reply = await self._step(history, pending if not fresh else [*fed, *pending], fresh, resend)
            if isinstance(reply, StageResult):
                if lost_at:
                    last = self.log.replays[-1]
                    self.log.replays[-1] = dataclasses.replace(last, duration_ms=now_ms() - lost_at)
                self._record(reply)
                return np.asarray(reply.tensors[self.route.logits_name])[0]
            lost_at = lost_at or now_ms()
            decision = decide_session(await self._fault(reply), self.policy)
            action = {Restore: RecoveryAction.RESTORE, Replay: RecoveryAction.REPLAY, Reroute: RecoveryAction.REPLAY}
            self.log.replays.append(
                Recovery(
                    self.log.steps,
                    reply.stage_index,
                    reply.worker_id,
                    reply.kind,
                    reply.error,
                    action=action.get(type(decision), RecoveryAction.FAIL),
                )
            )
            log.warning("session %s step %d: %s", self.session_id, self.log.steps, decision)
            if isinstance(decision, Fail):
                raise GenerationError(f"session {self.session_id} step {self.log.steps}: {decision.reason}")
            if isinstance(decision, Restore | Reroute):
                await self._take_over(decision.stage, decision.redistribute)
            if not isinstance(decision, Restore):  # a replay from the prompt: nothing to restore or to chase
                self._taken.clear()
                self._restore_stage = -1
            if isinstance(decision, Restore) and reply.tensors:  # the step came back: on from the failed stage
                await self._resend_at(reply)
            fresh, resend = isinstance(decision, Replay | Reroute) or fresh, not isinstance(decision, Restore)

    def _record(self, reply: StageResult) -> None:
        """A step done: its traces, kernel times, and any restore a holder's worker made on its own."""
        self.log.steps += 1
        self.log.traces = list(reply.trace)
        self.log.step_kernel_ms.append(sum(t.kernel_ms for t in reply.trace))
        self.log.replays += [
            Recovery(
                self.log.steps - 1,
                t.shard_index,
                t.worker_id,
                FailureKind.BROWSER_LOST,
                t.recovered,
                t.recovery_ms,
                RecoveryAction.RESTORE,
            )
            for t in reply.trace
            if t.recovered
        ]
        if any(t.shard_index == self._restore_stage and t.recovered for t in reply.trace):
            self._restore_stage = -1  # the new holder has the cache now
        for t in reply.trace:
            self.log.kernel_ms[t.shard_index] = self.log.kernel_ms.get(t.shard_index, 0.0) + t.kernel_ms

    async def _fault(self, reply: StageFailure) -> SessionFault:
        """The failure as ``decide_session`` weighs it: is the holder alive, is there a copy, who could help."""
        stage = reply.stage_index
        worker = self.route.workers[stage] if stage < len(self.route.workers) else reply.worker_id
        alive = self.holders is None or worker in await self.holders.alive([worker])
        replica, spare = await self.holders.candidates(self.route, stage) if self.holders else (False, False)
        copied = await copied_step(self.broker, self.session_id, stage)
        return SessionFault(
            stage=stage,
            kind=reply.kind,
            error=reply.error,
            holder_alive=alive,
            refused=reply.refusal == SessionRefusal.LIMIT,
            mirrored=copied is not None and copied in (self.log.steps - 1, self.log.steps),
            replica=replica,
            spare=spare,
            recoveries=sum(r.action is not RecoveryAction.RESTORE for r in self.log.replays),
        )

    async def _take_over(self, stage: int, redistribute: bool) -> None:
        """Give ``stage`` a new holder; steps stuck in the lost holder's stream are moved to it (``_chase``)."""
        assert self.holders is not None
        old = self.route.holders[stage]
        route = await self.holders.take_over(self.route, stage, redistribute)
        if route is None:
            raise GenerationError(f"session {self.session_id}: no worker could take stage {stage} over")
        self.route, self._taken[stage], self._restore_stage = route, old, stage

    async def _chase(self, step: int) -> None:
        """Send this step's hops that reached a lost holder's stream on to its stage's new holder, to restore
        the stage's cache from its copy in Redis there."""
        for stage, old in list(self._taken.items()):
            for d in await self.broker.range_entries(old, 64):
                hop = d.message
                if not isinstance(hop, StageHop) or (hop.session_id, hop.step) != (self.session_id, step):
                    continue
                self._sent += 1
                moved = dataclasses.replace(
                    hop, route=self.route.holders, attempt=self._sent, restore_stage=stage, enqueued_ms=now_ms()
                )
                await move_step(self.broker, old, d.entry_id, self.route.holders[stage], moved)
                log.warning("session %s step %d: moved to the new holder of stage %d", self.session_id, step, stage)

    async def _resend_at(self, failure: StageFailure) -> None:
        """The step again from the stage that failed, with the inputs it was given, to the stage's new holder,
        which restores the cache first (the stages before it already ran this step)."""
        r, stage = self.route, failure.stage_index
        hop = self._next_hop(failure.step, stage, dict(failure.tensors), trace=failure.trace, restore_stage=stage)
        await self.broker.add(r.holders[stage], hop)

    def _next_hop(
        self,
        step: int,
        stage: int,
        tensors: dict[str, np.ndarray],
        trace: tuple[StageTrace, ...] = (),
        fresh: bool = False,
        restore_stage: int = -1,
    ) -> StageHop:
        """The next hop of ``step`` at ``stage`` on the route as it is: each one its own attempt, so a late
        reply to an earlier one is never taken."""
        r = self.route
        self._sent += 1
        return StageHop(
            f"{self.session_id}#{step}",
            r.plan_id,
            stage,
            r.holders,
            self.reply_stream,
            tensors,
            now_ms(),
            self._sent,
            trace,
            session_id=self.session_id,
            step=step,
            stages=r.stages,
            states=tuple(s.as_entry() for s in r.slots),
            fresh=fresh,
            restore_stage=restore_stage,
        )

    async def _step(
        self, history: list[int], new: list[int], fresh: bool, resend: bool = True
    ) -> StageResult | StageFailure:
        if not resend:  # a restore: the step in flight is moved on, not sent again
            return await self._reply(self.log.steps)
        total = len(history) + len(new)
        feeds = {
            "input_ids": np.asarray([new], np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(len(history), total, dtype=np.int64)[None, :],
            **self._conditioning.tensors(fresh),
        }
        restore = -1 if fresh else self._restore_stage
        hop = self._next_hop(self.log.steps, 0, feeds, fresh=fresh, restore_stage=restore)
        await self.broker.add(self.route.holders[0], hop)
        return await self._reply(self.log.steps)

    async def _reply(self, step: int) -> StageResult | StageFailure:
        """The step's reply; a holder that stops heartbeating meanwhile is a lost cache (``WORKER_LOST``)."""
        deadline = time.monotonic() + self.step_timeout_s
        while time.monotonic() < deadline:
            for d in await self.broker.read(self.reply_stream, self._last_id, count=16, block_ms=500):
                self._last_id = d.entry_id
                msg: Message | None = d.message
                if isinstance(msg, StageResult | StageFailure) and (msg.step, msg.attempt) == (step, self._sent):
                    return msg
            await self._chase(step)
            lost = await self._lost_holder()
            if lost is not None:
                stage, worker = lost
                error = f"worker {worker} holding stage {stage} stopped heartbeating"
                r = self.route
                return StageFailure(
                    f"{self.session_id}#{step}",
                    r.plan_id,
                    stage,
                    worker,
                    self._sent,
                    FailureKind.WORKER_LOST,
                    error,
                    session_id=self.session_id,
                    step=step,
                )
        raise GenerationError(f"session {self.session_id} step {step}: no reply within {self.step_timeout_s}s")

    async def _lost_holder(self) -> tuple[int, str] | None:
        workers = self.route.workers
        if self.holders is None or not workers:
            return None
        live = await self.holders.alive(workers)
        return next(((i, w) for i, w in enumerate(workers) if w not in live), None)

    async def close(self) -> None:
        """Free the session's caches in every holder's page and in Redis, and drop its reply stream."""
        for holder in dict.fromkeys(self.route.holders):
            await self.broker.add(holder, SessionEnd(self.session_id))  # type: ignore[arg-type]
        await drop_cache_copies(self.broker, self.session_id, len(self.route.holders))
        await self.broker.delete(self.reply_stream)


def slots_of(stages: Sequence[object]) -> tuple[StateSlot, ...]:
    """Every stage's cache slots, batch 1, from planner stages (``state_pairs`` with ``empty_shape``)."""
    out = []
    for index, stage in enumerate(stages):
        for p in stage.state_pairs:  # type: ignore[attr-defined]
            out.append(StateSlot(index, p.input_name, p.output_name, p.dtype, p.empty_shape(1)))
    return tuple(out)
