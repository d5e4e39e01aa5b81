"""Request state in Redis: what makes a request survive a coordinator restart, finish once, or end in
the dead letter with its reason. Each change is one MULTI named after it.

    accept       request hash (pending, the stage-0 job) + inflight set + XADD stage 0
    finish       request hash (done|failed, the result) + expiry + inflight set - id + XACK/XDEL reply entry
    bury         XADD dead (the stage's job and why) + request hash (dead) + inflight set - id
    exhume       XDEL dead entry + request hash (pending) + inflight set + XADD the job again (replay)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .keys import MESSAGE_FIELD, REPLY_GROUP
from .messages import DeadLetter, Message, ShardJob, decode, decode_as, encode
from .streams import Broker, _str, _translated

RESULT_TTL_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class RequestState:
    request_id: str
    status: str  # pending | done | failed | dead
    coordinator_id: str
    plan_id: str
    created_ms: float
    job: ShardJob | None
    result: Message | None
    progress: dict[str, str]


class Ledger:
    """Request bookkeeping on top of a ``Broker`` (same connection, same namespace)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.keys = broker.keys
        self._redis = broker._redis

    async def accept(self, job: ShardJob, coordinator_id: str) -> str:
        key = self.keys.request(job.request_id)
        async with _translated(f"accept {job.request_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(
                key,
                mapping={
                    "status": "pending",
                    "coordinator": coordinator_id,
                    "plan": job.plan_id,
                    "created_ms": str(time.time() * 1000.0),
                    "job": encode(job),
                },
            )
            pipe.sadd(self.keys.inflight(coordinator_id), job.request_id)
            pipe.xadd(job.route[0], {MESSAGE_FIELD: encode(job)})
            replies = await pipe.execute()
        return _str(replies[-1])

    async def finish(
        self,
        request_id: str,
        coordinator_id: str,
        status: str,
        result: Message | None,
        reply_entry: tuple[str, str] | None = None,
    ) -> None:
        key = self.keys.request(request_id)
        async with _translated(f"finish {request_id}"):
            pipe = self._redis.pipeline(transaction=True)
            fields: dict[str, Any] = {"status": status, "finished_ms": str(time.time() * 1000.0)}
            if result is not None:
                fields["result"] = encode(result)
            pipe.hset(key, mapping=fields)
            pipe.hdel(key, "job")
            pipe.expire(key, RESULT_TTL_S)
            pipe.srem(self.keys.inflight(coordinator_id), request_id)
            if reply_entry is not None:
                pipe.xack(reply_entry[0], REPLY_GROUP, reply_entry[1])
                pipe.xdel(reply_entry[0], reply_entry[1])
            await pipe.execute()

    async def bury(self, dead: DeadLetter, coordinator_id: str) -> str:
        key = self.keys.request(dead.request_id)
        async with _translated(f"dead-letter {dead.request_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xadd(self.keys.dead, {MESSAGE_FIELD: encode(dead)})
            pipe.hset(key, mapping={"status": "dead", "reason": dead.reason})
            pipe.srem(self.keys.inflight(coordinator_id), dead.request_id)
            replies = await pipe.execute()
        return _str(replies[0])

    async def exhume(self, entry_id: str, job: ShardJob, coordinator_id: str) -> str:
        """Replay: move a dead letter's job back onto its stage stream (or a worker's), pending again."""
        key = self.keys.request(job.request_id)
        dst = job.route[job.stage_index]
        async with _translated(f"replay {entry_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.xdel(self.keys.dead, entry_id)
            pipe.hset(key, mapping={"status": "pending", "coordinator": coordinator_id, "plan": job.plan_id})
            pipe.persist(key)
            pipe.sadd(self.keys.inflight(coordinator_id), job.request_id)
            pipe.xadd(dst, {MESSAGE_FIELD: encode(job)})
            replies = await pipe.execute()
        return _str(replies[-1])

    async def inflight(self, coordinator_id: str) -> list[str]:
        async with _translated("SMEMBERS inflight"):
            return sorted(_str(x) for x in await self._redis.smembers(self.keys.inflight(coordinator_id)))

    async def state(self, request_id: str) -> RequestState | None:
        async with _translated(f"HGETALL {request_id}"):
            raw = await self._redis.hgetall(self.keys.request(request_id))
        if not raw:
            return None
        row = {_str(k): v for k, v in raw.items()}
        job = decode_as(row["job"], ShardJob, self.broker.limits) if "job" in row else None
        result = decode(row["result"], self.broker.limits) if "result" in row else None
        progress = {k: _str(v) for k, v in row.items() if k.startswith("s") and k[1:].isdigit()}
        return RequestState(
            request_id=request_id,
            status=_str(row.get("status", b"")),
            coordinator_id=_str(row.get("coordinator", b"")),
            plan_id=_str(row.get("plan", b"")),
            created_ms=float(_str(row.get("created_ms", b"0"))),
            job=job,
            result=result,
            progress=progress,
        )

    async def dead_letters(self, count: int = 1000) -> list[tuple[str, DeadLetter | None, str]]:
        """(entry id, dead letter or None if undecodable, decode error) oldest first."""
        async with _translated("XRANGE dead"):
            entries = await self._redis.xrange(self.keys.dead, "-", "+", count=count)
        out: list[tuple[str, DeadLetter | None, str]] = []
        for eid, fields in entries:
            d = self.broker._delivery(self.keys.dead, eid, fields)
            out.append((d.entry_id, d.message if isinstance(d.message, DeadLetter) else None, d.error or ""))
        return out
