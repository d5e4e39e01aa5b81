"""Stream operations on Redis/Valkey: the only place xshard talks to the server.

Multi-key state changes are one MULTI or one Lua script named after the change (``hand_off``: publish
downstream and ack upstream atomically). Redis errors are translated to ``BrokerUnavailable`` at this
boundary. Modules of ``broker`` that keep state of their own (``ledger``) build on the small public API
below, never on the connection: ``transaction(what)`` (one named MULTI), ``hash_fields``, ``set_members``,
``range_entries`` and ``decode_entry``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import Pipeline

from .address import connection_options, redact
from .codec import DEFAULT_LIMITS, Limits, pack
from .errors import BrokerUnavailable, MessageError, SchemaError
from .keys import MESSAGE_FIELD, Keys
from .messages import Message, decode, encode
from .registry import Connected, WorkerInfo, WorkerState

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
EVENTS_MAXLEN = 1_000_000

# KEYS: src, dst, request hash (or ""), events
# ARGV: group, id, consumer, msg, final, maxlen, n events, the n events, then (field, value) pairs of progress
HAND_OFF_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return false end
local has_request = KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1
local id = 'duplicate'
if not (ARGV[5] == '1' and has_request and redis.call('HGET', KEYS[3], 'status') ~= 'pending') then
  id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[4])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local n_events, n_progress, ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local a = 10
for i = a, a + n_events - 1 do redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'm', ARGV[i]) end
a = a + n_events
if has_request then
  for i = a, a + 2 * n_progress - 1, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
end
a = a + 2 * n_progress
for k = 5, #KEYS do
  local step, fresh, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local held = redis.call('HGET', KEYS[k], 'step')
  if fresh == '1' or held == false or tonumber(held) ~= step - 1 then redis.call('DEL', KEYS[k]) end
  if fresh == '1' or (held ~= false and tonumber(held) == step - 1) then
    for i = a + 3, a + 2 + 2 * n, 2 do redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1]) end
    redis.call('HSET', KEYS[k], 'step', step)
    redis.call('EXPIRE', KEYS[k], ttl)
  end
  a = a + 3 + 2 * n
end
return id
"""
SOCKET_TIMEOUT_S = 30.0
MIRROR_TTL_S = 900  # a session cache copy unused this long is gone (longer than a session's page TTL)


@dataclass(frozen=True, slots=True)
class MirrorWrite:
    """What one hand-off adds to the Redis copy of stage ``stage_index``'s cache of a session: the positions
    step ``step`` added to each cache tensor (by input name)."""

    session_id: str
    stage_index: int
    step: int
    fresh: bool
    pieces: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One stream entry as read: the decoded message, or why it could not be decoded."""

    stream: str
    entry_id: str
    message: Message | None
    error: str | None = None
    size_bytes: int = 0
    decode_ms: float = 0.0  # how long decoding the entry took


@asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    try:
        yield
    except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
        raise BrokerUnavailable(redact(f"{what}: broker unreachable: {e}")) from e
    except rexc.ResponseError as e:
        raise BrokerUnavailable(redact(f"{what}: broker refused: {e}")) from e


def _str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


@dataclass(slots=True)
class Transaction:
    """Commands queued on ``pipe`` for one MULTI (``Broker.transaction``); ``replies`` holds their replies,
    in order, once the block has run."""

    pipe: Pipeline
    replies: list[Any] = field(default_factory=list)

    def reply_text(self, index: int) -> str:
        """One reply as a string (the entry id of an XADD, say)."""
        return _str(self.replies[index])


class Broker:
    """An async connection to the broker, bound to one key namespace."""

    def __init__(
        self,
        url: str,
        namespace: str = "default",
        limits: Limits = DEFAULT_LIMITS,
        *,
        worker_id: str = "",
        ca_file: str | None = None,
    ) -> None:
        """``worker_id`` names a worker's connections; ``ca_file`` verifies ``rediss://`` (``address``)."""
        self.url = url  # with its password: show ``address.redact(url)``
        self.keys = Keys(namespace)
        self.limits = limits
        self._redis = aioredis.Redis.from_url(
            url,
            **connection_options(url, ca_file),
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=10,
            max_connections=64,
            client_name=self.keys.worker_client(worker_id) if worker_id else None,
        )

    async def __aenter__(self) -> Broker:
        await self.ping()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        async with _translated(f"ping {redact(self.url)}"):
            await self._redis.ping()

    # -- streams -----------------------------------------------------------------------------

    async def add(self, stream: str, msg: Message) -> str:
        async with _translated(f"XADD {stream}"):
            entry_id = await self._redis.xadd(stream, {MESSAGE_FIELD: encode(msg)})
        return _str(entry_id)

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        async with _translated(f"XGROUP CREATE {stream} {group}"):
            try:
                await self._redis.xgroup_create(stream, group, id=start_id, mkstream=True)
            except rexc.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    @asynccontextmanager
    async def transaction(self, what: str) -> AsyncIterator[Transaction]:
        """One MULTI named after the state change ``what``: queue commands on ``tx.pipe`` in the block; they
        run atomically when it ends, and ``tx.replies`` holds their replies. Nothing runs if the block raises.
        Redis errors become ``BrokerUnavailable`` naming ``what``."""
        async with _translated(what), self._redis.pipeline(transaction=True) as pipe:
            tx = Transaction(pipe)
            yield tx
            tx.replies = await pipe.execute()

    async def hash_fields(self, key: str) -> dict[str, bytes]:
        """HGETALL: every field of a hash (names as strings, values as stored); empty if there is none."""
        async with _translated(f"HGETALL {key}"):
            row = await self._redis.hgetall(key)
        return {_str(k): v for k, v in row.items()}

    async def hash_field(self, key: str, name: str) -> bytes | None:
        """HGET: one field of a hash, or None."""
        async with _translated(f"HGET {key}"):
            value = await self._redis.hget(key, name)
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    async def set_members(self, key: str) -> list[str]:
        """SMEMBERS, sorted."""
        async with _translated(f"SMEMBERS {key}"):
            return sorted(_str(x) for x in await self._redis.smembers(key))

    async def range_entries(self, stream: str, count: int) -> list[Delivery]:
        """XRANGE: the first ``count`` entries still on ``stream``, oldest first, decoded."""
        async with _translated(f"XRANGE {stream}"):
            entries = await self._redis.xrange(stream, "-", "+", count=count)
        return [self.decode_entry(stream, eid, fields) for eid, fields in entries]

    def decode_entry(self, stream: Any, entry_id: Any, fields: dict[bytes, bytes] | None) -> Delivery:
        """One stream entry as read: its message decoded within this broker's limits, or why it cannot be."""
        s, eid = _str(stream), _str(entry_id)
        raw = (fields or {}).get(MESSAGE_FIELD)
        if raw is None:
            return Delivery(s, eid, None, "entry has no message field (deleted or foreign)")
        started = time.perf_counter()
        try:
            msg = decode(raw, self.limits)
        except MessageError as e:
            return Delivery(s, eid, None, str(e), len(raw))
        return Delivery(s, eid, msg, None, len(raw), (time.perf_counter() - started) * 1000.0)

    async def read_group(
        self, group: str, consumer: str, streams: Iterable[str], *, count: int = 1, block_ms: int | None = 1000
    ) -> list[Delivery]:
        """XREADGROUP new entries (``>``) from ``streams``; blocks up to ``block_ms`` (None: not at all)."""
        wanted = {s: ">" for s in streams}
        if not wanted:
            return []
        async with _translated(f"XREADGROUP {group}"):
            reply = await self._redis.xreadgroup(group, consumer, wanted, count=count, block=block_ms)
        return [self.decode_entry(s, eid, f) for s, entries in reply or [] for eid, f in entries]

    async def read(self, stream: str, last_id: str, *, count: int = 16, block_ms: int = 1000) -> list[Delivery]:
        """Plain XREAD after ``last_id`` (for single-reader control streams)."""
        async with _translated(f"XREAD {stream}"):
            reply = await self._redis.xread({stream: last_id}, count=count, block=block_ms)
        return [self.decode_entry(s, eid, f) for s, entries in reply or [] for eid, f in entries]

    async def ack(self, stream: str, group: str, entry_id: str) -> None:
        """Ack and delete a finished entry (streams hold only unfinished work)."""
        async with self.transaction(f"XACK {stream}") as tx:
            tx.pipe.xack(stream, group, entry_id)
            tx.pipe.xdel(stream, entry_id)

    async def hand_off(
        self,
        src: str,
        group: str,
        entry_id: str,
        consumer: str,
        dst: str,
        msg: Message,
        *,
        events: Sequence[Message] = (),
        request_id: str = "",
        progress: Sequence[tuple[str, str]] = (),
        final: bool = False,
        mirror: Sequence[MirrorWrite] = (),
    ) -> str | None:
        """The ``hand_off`` change, one Lua script: if ``consumer`` still owns ``entry_id``, publish
        ``msg`` to ``dst``, ack and delete the entry, append ``events``, record ``progress`` ((field, value)
        pairs; a worker that ran several stages in one go records one per stage) in the request's hash, and
        extend each session cache copy of ``mirror`` by its step (a fresh step starts the copy anew; a copy
        that is not at the step before is dropped: it missed a step). A ``final`` hand-off of a request
        already done publishes nothing.

        Returns the new entry id; ``"duplicate"`` when the request was already done; None when the entry
        is no longer this consumer's (reclaimed by recovery: a late result must not duplicate)."""
        keys = [src, dst, self.keys.request(request_id) if request_id else "", self.keys.events]
        keys += [self.keys.mirror(m.session_id, m.stage_index) for m in mirror]
        args: list[Any] = [group, entry_id, consumer, encode(msg), "1" if final else "0", EVENTS_MAXLEN]
        args += [len(events), len(progress), MIRROR_TTL_S]
        args += [encode(e) for e in events]
        args += [x for pair in progress for x in pair]
        for m in mirror:
            args += [m.step, "1" if m.fresh else "0", len(m.pieces)]
            args += [x for name, tensor in m.pieces.items() for x in (f"{name}@{m.step}", pack(tensor))]
        async with _translated(f"hand_off {src} -> {dst}"):
            result = await self._redis.eval(HAND_OFF_LUA, len(keys), *keys, *args)
        return None if result is None else _str(result)

    async def read_own_pending(
        self, group: str, consumer: str, streams: Iterable[str], count: int = 16
    ) -> list[Delivery]:
        """Entries delivered to ``consumer`` and not yet acked (after a restart or a reconnect)."""
        wanted = {s: "0" for s in streams}
        if not wanted:
            return []
        async with _translated(f"XREADGROUP {group} pending"):
            reply = await self._redis.xreadgroup(group, consumer, wanted, count=count)
        return [self.decode_entry(s, eid, f) for s, entries in reply or [] for eid, f in entries if f]

    async def read_pending(
        self, group: str, consumer: str, streams: Iterable[str], *, count: int = 100
    ) -> list[Delivery]:
        """Every entry delivered to ``consumer`` and not acked yet, oldest first (paged XREADGROUP from 0)."""
        out: list[Delivery] = []
        for stream in streams:
            after = "0"
            while True:
                async with _translated(f"XREADGROUP {group} {stream} pending"):
                    reply = await self._redis.xreadgroup(group, consumer, {stream: after}, count=count)
                entries = [(eid, f) for _, batch in reply or [] for eid, f in batch]
                if not entries:
                    break
                out += [self.decode_entry(stream, eid, f) for eid, f in entries]
                after = out[-1].entry_id
        return out

    async def pending_for(self, stream: str, group: str, consumer: str) -> int:
        """How many entries of ``stream`` are delivered to ``consumer`` and not acked."""
        async with _translated(f"XPENDING {stream} {consumer}"):
            try:
                return len(await self._redis.xpending_range(stream, group, "-", "+", 100, consumername=consumer))
            except rexc.ResponseError:
                return 0

    async def claim_from(self, stream: str, group: str, owner: str, claimer: str) -> list[tuple[Delivery, int]]:
        """XCLAIM every entry ``owner`` holds on ``stream`` to ``claimer``; with each entry's delivery count."""
        async with _translated(f"XPENDING {stream} {owner}"):
            try:
                pending = await self._redis.xpending_range(stream, group, "-", "+", 1000, consumername=owner)
            except rexc.ResponseError:
                return []
            if not pending:
                return []
            ids = [p["message_id"] for p in pending]
            claimed = await self._redis.xclaim(stream, group, claimer, 0, ids)
        counts = {_str(p["message_id"]): int(p["times_delivered"]) + 1 for p in pending}
        return [(self.decode_entry(stream, eid, f), counts.get(_str(eid), 1)) for eid, f in claimed if f]

    async def claim_stale(self, stream: str, group: str, claimer: str, min_idle_ms: int) -> list[Delivery]:
        """XAUTOCLAIM entries idle for ``min_idle_ms`` or more to ``claimer`` (the periodic sweep)."""
        async with _translated(f"XAUTOCLAIM {stream}"):
            try:
                reply = await self._redis.xautoclaim(stream, group, claimer, min_idle_ms, "0-0", count=100)
            except rexc.ResponseError:
                return []
        entries = reply[1] if reply else []
        return [self.decode_entry(stream, eid, f) for eid, f in entries if f]

    async def emit(self, event: Message) -> str:
        """Append an event to the events stream (bounded: at most ``EVENTS_MAXLEN`` unconsumed)."""
        async with _translated("XADD events"):
            entry_id = await self._redis.xadd(
                self.keys.events, {MESSAGE_FIELD: encode(event)}, maxlen=EVENTS_MAXLEN, approximate=True
            )
        return _str(entry_id)

    async def read_events(self, count: int = 100_000) -> list[Message]:
        """Events still on the events stream (not yet consumed by the history writer), oldest first."""
        return [d.message for d in await self.range_entries(self.keys.events, count) if d.message is not None]

    async def worker_info(self, worker_id: str) -> WorkerInfo | None:
        """One worker's registration (dead or alive), or None if it never registered or unregistered."""
        async with _translated(f"HGETALL worker {worker_id}"):
            row = await self._redis.hgetall(self.keys.worker(worker_id))
        return WorkerInfo.from_fields(worker_id, row) if row else None

    async def connected_workers(self) -> Connected:
        """Workers with a connection open now (CLIENT LIST, names from ``Keys.worker_client``); one round trip."""
        prefix = self.keys.worker_client("")
        async with _translated("CLIENT LIST"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.client_list()
            pipe.info("server")
            clients, info = await pipe.execute()
        names = (_str(c.get("name", "")) for c in clients)
        return Connected(frozenset(n[len(prefix) :] for n in names if n.startswith(prefix)), str(info.get("run_id")))

    async def stream_length(self, stream: str) -> int:
        async with _translated(f"XLEN {stream}"):
            return int(await self._redis.xlen(stream))

    async def pending_count(self, stream: str, group: str) -> int:
        async with _translated(f"XPENDING {stream}"):
            try:
                info = await self._redis.xpending(stream, group)
            except rexc.ResponseError:
                return 0
        return int(info["pending"])

    async def delete(self, *keys: str) -> None:
        if keys:
            async with _translated("DEL"):
                await self._redis.delete(*keys)

    async def scan_keys(self, pattern: str | None = None) -> list[str]:
        async with _translated("SCAN"):
            return sorted([_str(k) async for k in self._redis.scan_iter(match=pattern or self.keys.pattern)])

    # -- worker registry ---------------------------------------------------------------------

    async def register_worker(self, info: WorkerInfo, now_ms: int) -> None:
        """Write the whole registration and the first heartbeat, in one MULTI."""
        fields = {**info.to_fields(), "heartbeat_ms": str(now_ms)}
        async with _translated(f"register worker {info.worker_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self.keys.worker(info.worker_id))
            pipe.hset(self.keys.worker(info.worker_id), mapping=fields)
            pipe.zadd(self.keys.workers, {info.worker_id: now_ms})
            await pipe.execute()

    async def heartbeat(self, worker_id: str, now_ms: int, stages: Iterable[str], state: WorkerState) -> None:
        """Refresh the heartbeat, the stages served and the state (the rest of the registration stays)."""
        fields = {"heartbeat_ms": str(now_ms), "stages": json.dumps(sorted(stages)), "state": state.value}
        async with _translated(f"heartbeat {worker_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self.keys.worker(worker_id), mapping=fields)
            pipe.zadd(self.keys.workers, {worker_id: now_ms})
            await pipe.execute()

    async def unregister_worker(self, worker_id: str) -> None:
        async with _translated(f"unregister worker {worker_id}"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self.keys.workers, worker_id)
            pipe.delete(self.keys.worker(worker_id), self.keys.control(worker_id))
            await pipe.execute()

    async def live_workers(self, now_ms: int, max_age_ms: int) -> list[WorkerInfo]:
        """Registrations of workers whose last heartbeat is at most ``max_age_ms`` old, by worker id.

        A registration that cannot be decoded (a foreign or older writer) is logged and left out."""
        async with _translated("live workers"):
            ids = await self._redis.zrangebyscore(self.keys.workers, now_ms - max_age_ms, "+inf")
            pipe = self._redis.pipeline(transaction=False)
            for wid in ids:
                pipe.hgetall(self.keys.worker(_str(wid)))
            rows = await pipe.execute()
        out = []
        for wid, row in zip(ids, rows, strict=True):
            if not row:
                continue
            try:
                out.append(WorkerInfo.from_fields(_str(wid), row))
            except SchemaError as e:
                log.warning("ignoring worker %s: %s", _str(wid), e)
        return sorted(out, key=lambda w: w.worker_id)
