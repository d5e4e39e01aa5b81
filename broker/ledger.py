"""Request state in Redis: what makes a request survive a coordinator restart, finish once, or end in
the dead letter with its reason. Each change is one MULTI named after it (``Broker.transaction``); the
ledger uses only ``Broker``'s public API.

    accept       request hash (pending, the stage-0 job) + inflight set + XADD stage 0
    accept DAG   request hash (pending, the request's inputs as a ``DagRequest``) + inflight set; its
                 segments are sub-requests accepted on their own (``<request id>-s<first stage>``)
    finish       request hash (done|failed, the result) + expiry + inflight set - id + XACK/XDEL reply entry
    bury         XADD dead (the stage's job and why) + request hash (dead) + inflight set - id
    exhume       XDEL dead entry + request hash (pending) + inflight set + XADD the job again (replay)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .keys import MESSAGE_FIELD, REPLY_GROUP
from .messages import DagRequest, DeadLetter, Message, StageHop, decode, decode_as, encode
from .streams import Broker

RESULT_TTL_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class RequestState:
    request_id: str
    status: str  # pending | done | failed | dead
    coordinator_id: str
    plan_id: str
    created_ms: float
    job: StageHop | None
    result: Message | None
    progress: dict[str, str]
    dag: DagRequest | None = None  # a DAG plan's request: its inputs, until it finishes
    reason: str = ""  # why it was dead-lettered


class Ledger:
    """Request bookkeeping on top of a ``Broker`` (same connection, same namespace)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.keys = broker.keys

    async def accept(self, job: StageHop, coordinator_id: str) -> str:
        """The ``accept`` change; returns the entry id of the job on its first stage's stream (stage 0 for a
        chain's request, a later one for a DAG segment's sub-request)."""
        fields = {
            "status": "pending",
            "coordinator": coordinator_id,
            "plan": job.plan_id,
            "created_ms": str(time.time() * 1000.0),
            "job": encode(job),
        }
        async with self.broker.transaction(f"accept {job.request_id}") as tx:
            tx.pipe.hset(self.keys.request(job.request_id), mapping=fields)
            tx.pipe.sadd(self.keys.inflight(coordinator_id), job.request_id)
            tx.pipe.xadd(job.route[job.stage_index], {MESSAGE_FIELD: encode(job)})
        return tx.reply_text(-1)

    async def accept_dag(self, request: DagRequest, coordinator_id: str) -> None:
        """The ``accept DAG`` change: the parent of a DAG plan's sub-requests, with the request's inputs."""
        fields = {
            "status": "pending",
            "coordinator": coordinator_id,
            "plan": request.plan_id,
            "created_ms": str(request.ts_ms),
            "dag": encode(request),
        }
        async with self.broker.transaction(f"accept {request.request_id}") as tx:
            tx.pipe.hset(self.keys.request(request.request_id), mapping=fields)
            tx.pipe.sadd(self.keys.inflight(coordinator_id), request.request_id)

    async def finish(
        self,
        request_id: str,
        coordinator_id: str,
        status: str,
        result: Message | None,
        reply_entry: tuple[str, str] | None = None,
    ) -> None:
        """The ``finish`` change (with the ack of the reply entry that carried the result, if any)."""
        key = self.keys.request(request_id)
        fields: dict[str, Any] = {"status": status, "finished_ms": str(time.time() * 1000.0)}
        if result is not None:
            fields["result"] = encode(result)
        async with self.broker.transaction(f"finish {request_id}") as tx:
            tx.pipe.hset(key, mapping=fields)
            tx.pipe.hdel(key, "job", "dag")
            tx.pipe.expire(key, RESULT_TTL_S)
            tx.pipe.srem(self.keys.inflight(coordinator_id), request_id)
            if reply_entry is not None:
                tx.pipe.xack(reply_entry[0], REPLY_GROUP, reply_entry[1])
                tx.pipe.xdel(reply_entry[0], reply_entry[1])

    async def bury(self, dead: DeadLetter, coordinator_id: str) -> str:
        """The ``bury`` change; returns the dead letter's entry id."""
        async with self.broker.transaction(f"dead-letter {dead.request_id}") as tx:
            tx.pipe.xadd(self.keys.dead, {MESSAGE_FIELD: encode(dead)})
            tx.pipe.hset(self.keys.request(dead.request_id), mapping={"status": "dead", "reason": dead.reason})
            tx.pipe.srem(self.keys.inflight(coordinator_id), dead.request_id)
        return tx.reply_text(0)

    async def exhume(self, entry_id: str, job: StageHop, coordinator_id: str) -> str:
        """Replay: move a dead letter's job back onto its stage stream (or a worker's), pending again."""
        key = self.keys.request(job.request_id)
        async with self.broker.transaction(f"replay {entry_id}") as tx:
            tx.pipe.xdel(self.keys.dead, entry_id)
            tx.pipe.hset(key, mapping={"status": "pending", "coordinator": coordinator_id, "plan": job.plan_id})
            tx.pipe.persist(key)
            tx.pipe.sadd(self.keys.inflight(coordinator_id), job.request_id)
            tx.pipe.xadd(job.route[job.stage_index], {MESSAGE_FIELD: encode(job)})
        return tx.reply_text(-1)

    async def known(self, request_id: str) -> bool:
        """Whether the request was accepted (its hash exists: ``accept`` wrote it in the MULTI with its job)."""
        return await self.broker.hash_field(self.keys.request(request_id), "status") is not None

    async def inflight(self, coordinator_id: str) -> list[str]:
        return await self.broker.set_members(self.keys.inflight(coordinator_id))

    async def state(self, request_id: str) -> RequestState | None:
        row = await self.broker.hash_fields(self.keys.request(request_id))
        if not row:
            return None
        limits = self.broker.limits
        job = decode_as(row["job"], StageHop, limits) if "job" in row else None
        result = decode(row["result"], limits) if "result" in row else None
        progress = {k: v.decode() for k, v in row.items() if k.startswith("s") and k[1:].isdigit()}
        return RequestState(
            request_id=request_id,
            status=row.get("status", b"").decode(),
            coordinator_id=row.get("coordinator", b"").decode(),
            plan_id=row.get("plan", b"").decode(),
            created_ms=float(row.get("created_ms", b"0").decode()),
            job=job,
            result=result,
            progress=progress,
            dag=decode_as(row["dag"], DagRequest, limits) if "dag" in row else None,
            reason=row.get("reason", b"").decode(),
        )

    async def dead_letters(self, count: int = 1000) -> list[tuple[str, DeadLetter | None, str]]:
        """(entry id, dead letter or None if undecodable, decode error) oldest first."""
        return [
            (d.entry_id, d.message if isinstance(d.message, DeadLetter) else None, d.error or "")
            for d in await self.broker.range_entries(self.keys.dead, count)
        ]
