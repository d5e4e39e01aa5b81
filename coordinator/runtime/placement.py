"""Placement: which worker serves which stage, and the one place that builds an ``Assignment``.

``match_browsers`` pairs each shard's slot (the browser it asks for) with a distinct registered worker.
``Placement`` sends the assignments, waits for the workers to load their shards, and keeps the record
both of what was loaded where (``allocation``, as ``get_metrics`` shows it) and of every stage stream
each worker was told to consume (``assigned``, released when an external deployment closes). The first
placement (``load``) and recovery's redistribution (``assign_stage``) go through the same builder.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.messages import Assignment, AssignmentReply
from broker.registry import WorkerInfo
from coordinator.errors import AllocationError
from coordinator.planning.allocation import Slot
from coordinator.planning.shardset import ShardSet
from coordinator.planning.sizing import gb, pages_that_fit, shard_need_bytes
from coordinator.runtime.dispatch import Dispatcher
from coordinator.runtime.fleet import Fleet

log = logging.getLogger(__name__)

REDISTRIBUTED = "redistributed by recovery"


@dataclass(frozen=True, slots=True)
class Match:
    """Workers chosen for each shard (the first is the shard's own, any more scale it out), and the slots
    as they ended up (a slot whose browser had no free worker names the one used instead)."""

    workers: dict[int, list[str]]
    slots: dict[int, Slot]


def match_browsers(
    slots: Mapping[int, Slot],
    live: Sequence[WorkerInfo],
    *,
    substitute: bool,
    shards: Sequence[Sequence[int]] = (),
) -> Match | None:
    """Give each shard a distinct live worker of its slot's browser; extra workers are spread over the shards.

    ``shards`` are the stages of each shard (``Plan.shard_groups``; default: each slot its own): all stages
    of a shard go to the worker chosen for its first stage's slot. Where a shard's browser has no free
    worker: None, or with ``substitute`` the first free worker of any browser (None all the same when no
    worker is left at all).
    """
    groups = [tuple(g) for g in shards] or [(i,) for i in slots]
    free = list(live)
    chosen: dict[int, list[str]] = {}
    out = dict(slots)
    for members in groups:
        slot = slots[members[0]]
        w = next((w for w in free if w.browser == slot.browser), None)
        if w is None:
            if not substitute or not free:
                return None
            w = free[0]
        free.remove(w)
        for i in members:
            asked = slots[i]
            if w.browser != asked.browser:
                why = (
                    f"no free {asked.browser} worker registered, used {w.browser}"
                    if asked.browser == slot.browser
                    else f"with stage {members[0]} in one shard"
                )
                out[i] = Slot(w.browser, asked.platform, asked.specialization, f"{asked.reason}; {why}")
            chosen[i] = [w.worker_id]
    for k, extra in enumerate(free):
        for i in groups[k % len(groups)]:
            chosen[i].append(extra.worker_id)
    return Match(chosen, out)


@dataclass(frozen=True, slots=True)
class Target:
    """What is placed: the model's shards under this name, on these stage streams."""

    model_name: str
    shard_type: str
    shards: ShardSet
    route: tuple[str, ...]


class Placement:
    """Assignments of one plan's stages to workers, and the record of where each shard was loaded."""

    def __init__(self, target: Target, slots: Mapping[int, Slot], dispatcher: Dispatcher, fleet: Fleet) -> None:
        self.target = target
        self.slots = dict(slots)
        self.dispatcher = dispatcher
        self.fleet = fleet
        # shard index -> where it was loaded: a report (replicas inside)
        self.allocation: dict[int, dict[str, Any]] = {}
        self.holders: dict[int, str] = {}  # stage index -> the worker its first load went to: routing state
        self.assigned: dict[str, list[str]] = {}  # worker id -> stage streams it was told to consume

    def assignment(self, index: int) -> Assignment:
        """The one builder: load shard ``index`` and consume its stage stream."""
        shards, stage = self.target.shards, self.target.shards.plan.stages[index]
        slot = self.slots.get(index)
        choice = shards.choice_of(index)
        return Assignment(
            assignment_id=uuid.uuid4().hex,
            plan_id=shards.plan.plan_id,
            shard_index=index,
            stage_stream=self.target.route[index],
            onnx_sha256=shards.shard_sha256[index],
            input_names=stage.input_names,
            carry_names=stage.carry_names,
            platform=slot.platform if slot else "auto",
            reply_stream=self.dispatcher.reply_stream,
            model_name=self.target.model_name,
            shard_type=self.target.shard_type,
            kind=stage.kind,
            dtype=choice.precision.value,
            providers=choice.providers,
        )

    async def _send(self, index: int, worker_id: str) -> tuple[Assignment, asyncio.Future[AssignmentReply]]:
        a = self.assignment(index)
        return a, await self.dispatcher.assign(worker_id, a)

    def _served(self, index: int, worker_id: str, stage_stream: str) -> None:
        self.assigned.setdefault(worker_id, []).append(stage_stream)
        self.fleet.add(index, worker_id)

    def _record(self, index: int, slot: Slot, worker_id: str, reply: AssignmentReply) -> None:
        entry = {
            **slot.as_dict(),
            "worker_id": worker_id,
            "execution_provider": reply.execution_provider,
            "adapter": reply.adapter,
            "user_agent": reply.user_agent,
            "load_ms": round(reply.load_ms, 1),
            "requested_platform": slot.platform,
            "platform": reply.execution_provider,
            "platform_note": reply.note,
            "wasm_threads": reply.wasm_threads,
            **self.target.shards.choice_of(index).as_dict(),
            "nodes": reply.nodes,
            "cpu_nodes": reply.cpu_nodes,
            "cpu_ops": reply.cpu_ops,
        }
        if self.target.shards.plan.groups:  # several stages per shard: say which shard holds this one
            entry["shard"] = self.target.shards.plan.group_of(index)
        if index in self.allocation:
            self.allocation[index].setdefault("replicas", []).append(entry)
        else:
            self.allocation[index] = entry
            self.holders[index] = worker_id

    def misfit(self, index: int, worker_id: str) -> str | None:
        """Why shard ``index`` must not go to ``worker_id``'s page (it needs more than the registered budget),
        or None; a worker that registered no budget is taken to fit (``sizing.pages_that_fit``)."""
        info = self.fleet.live.get(worker_id)
        need = shard_need_bytes(self.target.shards.profile, self.target.shards.plan.stages[index])
        if info is None or pages_that_fit(need, [info]):
            return None
        return f"shard {index} needs {gb(need)}; the page of {worker_id} holds {gb(info.page_budget_bytes)}"

    async def load(self, workers: Mapping[int, Sequence[str]], timeout_s: float) -> None:
        """Assign every stage to its workers and wait until all loaded their shard; AllocationError if not
        (before anything is sent, when a shard does not fit its worker's page)."""
        misfits = [m for i, ids in workers.items() for w in ids if (m := self.misfit(i, w))]
        if misfits:
            raise AllocationError("shards do not fit their pages: " + "; ".join(misfits))
        futures: dict[tuple[int, str], asyncio.Future[AssignmentReply]] = {}
        for stage in self.target.shards.plan.stages:
            for wid in workers[stage.index]:
                a, futures[(stage.index, wid)] = await self._send(stage.index, wid)
                self._served(stage.index, wid, a.stage_stream)
        try:
            async with asyncio.timeout(timeout_s):
                replies = {k: await f for k, f in futures.items()}
        except TimeoutError as e:
            raise AllocationError(f"workers did not load their shards within {timeout_s}s") from e
        failed = [f"shard {i} on {wid}: {r.error}" for (i, wid), r in replies.items() if not r.ok]
        if failed:
            raise AllocationError("loading shards failed: " + "; ".join(failed))
        for (i, wid), reply in sorted(replies.items()):
            self._record(i, self.slots[i], wid, reply)

    async def assign_stage(self, index: int, worker_id: str, timeout_s: float) -> bool:
        """Redistribute: load stage ``index``'s shard onto ``worker_id`` and make it consume the stage."""
        if worker_id in self.fleet.serving.get(index, []):
            return True
        if why := self.misfit(index, worker_id):
            log.warning("not redistributing onto %s: %s", worker_id, why)
            return False
        a, fut = await self._send(index, worker_id)
        try:
            reply = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            log.warning("redistributing shard %d onto %s: no reply within %ss", index, worker_id, timeout_s)
            return False
        if not reply.ok:
            log.warning("redistributing shard %d onto %s failed: %s", index, worker_id, reply.error)
            return False
        self._served(index, worker_id, a.stage_stream)
        asked = self.slots.get(index)
        slot = Slot(
            self.fleet.browser(worker_id),
            asked.platform if asked else "auto",
            asked.specialization if asked else "",
            REDISTRIBUTED,
        )
        self._record(index, slot, worker_id, reply)
        return True
